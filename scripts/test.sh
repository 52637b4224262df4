#!/usr/bin/env bash
# The test suite: set up .venv with the dev extra, then run pytest. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" "dev"
cd "$root"
set +e
"$venv/bin/pytest" --durations=15 "$@"  # and the 15 slowest tests
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
