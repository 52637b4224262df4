"""Checkpoint folders in the Hugging Face layout, for every backend: find one (a local folder or a Hub id,
through huggingface_hub) and read its config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# The small model shipped with the package (a dla_gated_deltanet trained on Python's standard library by
# scripts/make_default_model.sh; manifest.json says how, with its validation loss and file hashes).
DEFAULT_MODEL = Path(__file__).with_name("default_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def resolve(path_or_id) -> Path:
    """A local folder as it is; anything else is a Hub repository id, downloaded (config, weights, tokenizer)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path_or_id!r} is a file; expected a checkpoint folder or a Hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.txt"]))


def read_config(folder) -> dict:
    file = Path(folder, "config.json")
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(file.read_text())


def copy_tokenizer(source, folder) -> None:
    """Copy whatever tokenizer files ``source`` has into ``folder``."""
    for name in TOKENIZER_FILES:
        if Path(source, name).exists():
            shutil.copy(Path(source, name), Path(folder, name))
