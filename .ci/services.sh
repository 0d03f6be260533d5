#!/usr/bin/env bash
# Make sure the services the tests need are up: PostgreSQL at 127.0.0.1:5432 (trust auth for local tests).
# Installs Debian's postgresql when it is missing (as root), starts the cluster, waits until it answers.
set -uo pipefail
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
