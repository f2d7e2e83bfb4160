#!/usr/bin/env bash
# The README's test command: set up .venv, then lint, type-check, check import layers, run pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" -x).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
./scripts/system_deps.sh   # promtool and systemd-analyze for the packaging/metrics tests
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== import layers"; .venv/bin/lint-imports
echo "== pytest"
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure (a test run must test something)" >&2
  exit 1
fi
exit "$rc"
