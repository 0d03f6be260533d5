#!/usr/bin/env bash
# The stages of `make test` (default: smoke-sized, minutes) and `make test-slow` (the cells flagged `slow` and the
# tests marked slow), each timed, with a summary at the end. Every stage runs even if one before it failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mode=${1:-default}
names=(); secs=(); codes=()
stage() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name"
  "$@"; local rc=$?
  names+=("$name"); secs+=($(( $(date +%s) - t0 ))); codes+=("$rc")
}
if [ "$mode" = slow ]; then
  stage "notebooks with their slow cells (nbdev-test --flags slow)" "$BIN/nbdev-test" --n-workers 2 --timing --flags slow
  stage "tests/ marked slow (pytest -m slow)" "$BIN/python" -m pytest -n 2 --dist loadfile -m slow tests
else
  stage "lint (ruff check: notebooks, tests/, hub/, dask/; pyproject.toml [tool.ruff])" "$BIN/ruff" check
  stage "notebooks (nbdev-test)" "$BIN/nbdev-test" --n-workers 2 --timing
  stage "tests/ (pytest -m 'not slow')" "$BIN/python" -m pytest -n 2 --dist loadfile -m "not slow" tests
  stage "tutorials (pytest --nbval-lax)" "$BIN/python" -m pytest --nbval-lax -p no:cacheprovider nbs/tutorials
fi
echo; echo "== time per stage ($mode)"
failed=0; total=0
for i in "${!names[@]}"; do
  status=ok; [ "${codes[$i]}" = 0 ] || { status=FAILED; failed=1; }
  printf '%6d s  %-6s %s\n' "${secs[$i]}" "$status" "${names[$i]}"
  total=$(( total + secs[i] ))
done
printf '%6d s  in all\n' "$total"
exit $failed
