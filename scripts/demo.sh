#!/usr/bin/env bash
# The main job on its embedded default: set up .venv, then generate Python with the DLA model shipped in the
# package, through MLX (Metal on a Mac, the CPU elsewhere), streamed, with mlx_lm-style speed figures; then
# show where one layer's state cache opened states over the prompt and output, and plot it to
# dla_boundaries.png. Extra arguments go to dla-generate (bash scripts/demo.sh --help lists them).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" ""
prompt=$'import os\n\n\ndef read_lines(path):\n'
exec "$venv/bin/dla-generate" --prompt "$prompt" --max-tokens 200 --temp 0.7 --top-p 0.95 --seed 0 \
  --boundaries dla_boundaries.png "$@"
