"""Copy a finished training run's model into a folder to ship, with ``manifest.json``: how it was made,
its validation loss and training speed (from the run's metrics.jsonl), and the SHA-256 of every file.

    python scripts/ship_model.py runs/default --out shared/default_model --train-config configs/default.json \
        --command "bash scripts/make_default_model.sh"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a dla-train output folder (with model/ and metrics.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--command", required=True, help="the command that reproduces the run, for the manifest")
    p.add_argument("--train-config", required=True, help="the run's dla-train config file, for the manifest")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    if not (run / "model" / "model.safetensors").exists():
        raise SystemExit(f"{run}/model/model.safetensors not found: is {run} a finished dla-train run?")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    valid = [m for m in metrics if "valid_loss" in m]
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(f.name for f in (run / "model").iterdir() if f.is_file())
    for name in files:
        shutil.copy(run / "model" / name, out / name)
    manifest = {
        "command": args.command,
        "train_config": json.loads(Path(args.train_config).read_text()),
        "steps": steps[-1]["step"],
        "train_loss": steps[-1]["loss"],
        "valid_loss": valid[-1]["valid_loss"] if valid else None,
        "train_tokens_per_s": sum(m["tokens_per_s"] for m in steps) / len(steps),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sha256": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {len(files)} files, valid loss {manifest['valid_loss']}, "
          f"{manifest['train_tokens_per_s']:.0f} tokens/s in training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
