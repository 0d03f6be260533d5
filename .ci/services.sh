#!/usr/bin/env bash
# Make sure what the tests need is here and up: Debian's chromium for the browser tests (installed when missing, as
# root), and PostgreSQL at 127.0.0.1:5432 (trust auth for local tests): installed when missing, started, waited on.
set -uo pipefail
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "services: installing chromium (Debian) for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || true
  fi
  if ! [ -x /usr/bin/chromium ]; then
    if [ "${CI:-}" = "true" ]; then echo "services: /usr/bin/chromium is missing and could not be installed" >&2; exit 1; fi
    echo "services: /usr/bin/chromium is missing; browser tests will be skipped (outside CI only)" >&2
  fi
fi
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ready; then echo "services: PostgreSQL is up at 127.0.0.1:5432"; exit 0; fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "services: installing PostgreSQL (Debian)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || true
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      if [ -f "$hba" ] && ! grep -q "hedgerl-tests" "$hba"; then
        { printf '# hedgerl-tests: trust on loopback, for the test suite\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'; cat "$hba"; } > "$hba.new" && mv "$hba.new" "$hba"
      fi
    done
  fi
fi
if command -v pg_ctlcluster >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$ver" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || true
    pg_ctlcluster --skip-systemctl-redirect "$ver" main reload 2>/dev/null || true
  fi
fi
for _ in $(seq 1 30); do ready && { echo "services: PostgreSQL is up at 127.0.0.1:5432"; exit 0; }; sleep 1; done
if [ "${CI:-}" = "true" ]; then echo "services: PostgreSQL is not reachable at 127.0.0.1:5432 and could not be started" >&2; exit 1; fi
echo "services: PostgreSQL is not reachable; registry tests on PostgreSQL will be skipped (outside CI only)" >&2
exit 0
