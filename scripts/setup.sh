# Sourced by demo.sh and test.sh: make (or reuse) the virtual environment $DLA_VENV (default .venv)
# and install this repository into it, with the extras named in $1 (e.g. "dev").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DLA_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
py="$venv/bin/python"
# torch first, pinned: a plain "torch" would fetch the newest (CUDA) build; an installed torch is kept.
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "==> installing torch 2.13.0" >&2
  "$py" -m pip install -q torch==2.13.0
fi
extras="${1:-}"
echo "==> installing dla${extras:+[$extras]} from $root" >&2
"$py" -m pip install -q "$root${extras:+[$extras]}"
