#!/usr/bin/env bash
# Runs pytest and always prints its summary; "no tests collected" (exit 5) is a failure too.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing the run" >&2
  exit 1
fi
exit "$rc"
