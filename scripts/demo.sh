#!/usr/bin/env bash
# The main job on its embedded default: set up .venv, then stream synthetic sequences through the
# fenwick, fixed and dla policies, print B(pi) and needle recall, write dla_boundaries.png.
# Extra arguments go to dla-demo (see: bash scripts/demo.sh --help).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" ""
exec "$venv/bin/dla-demo" "$@"
