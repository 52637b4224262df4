#!/usr/bin/env bash
# The recorded command behind the shipped default model (shared/default_model, installed as
# dla_shared/default_model): prepare the standard-library corpus, train configs/default.json on one CPU
# thread, then copy the model into the package with a manifest (command, data, validation loss, speed,
# SHA-256 of every file). About an hour on one core of the development machine.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" ""
cd "$root"
"$venv/bin/python" scripts/prepare_tiny.py --out data/stdlib
OMP_NUM_THREADS=1 "$venv/bin/dla-train" --config configs/default.json
exec "$venv/bin/python" scripts/ship_model.py runs/default --out shared/default_model \
  --train-config configs/default.json --command "bash scripts/make_default_model.sh"
