#!/usr/bin/env bash
# The test suite: set up .venv with the dev extra, then run pytest. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" "dev"
cd "$root"
set +e
# On every core, at most 4 workers (each imports torch and MLX); the 15 slowest tests are printed.
"$venv/bin/pytest" -n auto --maxprocesses 4 --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
