"""Checkpoint folders in the Hugging Face layout, for every backend: find one (a local folder or a Hub id,
through huggingface_hub), read its config, and write one without ever leaving a half-written model."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# The small model shipped with the package (a dla_gated_deltanet trained on Python's standard library by
# scripts/make_default_model.sh; manifest.json says how, with its validation loss and file hashes).
DEFAULT_MODEL = Path(__file__).with_name("default_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
MANIFEST = "manifest.json"


def resolve(path_or_id) -> Path:
    """A local folder as it is (checked against its manifest, `verify`); anything else is a Hub repository
    id, downloaded (config, weights, tokenizer). A name that is neither a folder nor a Hub id that can be
    fetched is a FileNotFoundError that names both possibilities."""
    path = Path(path_or_id)
    if path.is_dir():
        return verify(path)
    if path.exists():
        raise ValueError(f"{path_or_id!r} is a file; expected a checkpoint folder or a Hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    name = str(path_or_id)
    try:
        validate_repo_id(name)
    except ValueError:
        raise FileNotFoundError(f"no such folder: {name!r} (and it is not a Hub repository id)") from None
    try:
        folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as error:  # offline, no such repository, no access: all end here
        raise FileNotFoundError(f"{name!r} is not a local folder, and the Hub repository {name!r} could not be "
                                f"fetched ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                                ) from error
    return verify(Path(folder))


def verify(folder: Path) -> Path:
    """Check a folder's files against the SHA-256 hashes of its ``manifest.json`` (`scripts/ship_model.py`
    writes one; about 0.1 s for the shipped model), if it has one; return the folder."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return folder
    for name, expected in json.loads(manifest.read_text()).get("sha256", {}).items():
        file = folder / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing; {manifest} lists it")
        stat = file.stat()
        if _sha256(file.resolve(), stat.st_size, stat.st_mtime_ns) != expected:
            raise ValueError(f"{file} does not match its SHA-256 in {manifest}: the file is damaged or was changed "
                             "(if you changed it on purpose, delete manifest.json)")
    return folder


def read_config(folder) -> dict:
    file = Path(folder, "config.json")
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(file.read_text(), object_hook=_untag_float)


def _untag_float(obj: dict):
    """mlx-lm writes a non-finite float as {"__float__": "Infinity"} (Mamba-2's time_step_limit)."""
    return float(obj["__float__"]) if obj.keys() == {"__float__"} else obj


def copy_tokenizer(source, folder) -> None:
    """Copy whatever tokenizer files ``source`` has into ``folder``."""
    for name in TOKENIZER_FILES:
        if Path(source, name).exists():
            shutil.copy(Path(source, name), Path(folder, name))


def check_output(out, source=None, force: bool = False) -> None:
    """Refuse an ``out`` folder that is the ``source`` folder or inside it, a file, or not empty (unless
    ``force``); the errors name the argument."""
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise ValueError(f"out {str(out)!r} is the source folder or inside it; write to another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; expected a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"out {str(out)!r} is not empty; choose a new folder, or pass force=True "
                              "(--force) to replace the model in it")


def check_output_file(path, name: str, suffixes=None) -> Path:
    """Refuse, before any work, an output file ``path`` (the argument ``name``) that cannot be written where
    asked: a folder, in a folder that does not exist, or (``suffixes`` given) without one of those suffixes,
    which would write another file than the one named (matplotlib adds ``.png`` to a name without one)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; expected a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{name} {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{name} {str(path)!r} must end in one of {', '.join(suffixes)}")
    return path


def check_output_files(parser, *outputs) -> None:
    """`check_output_file` for each (argument name, path or None, suffixes or None) of a command line; a
    refusal is the parser's error (exit status 2), before any work."""
    for name, path, suffixes in outputs:
        if path is not None:
            try:
                check_output_file(path, name, suffixes)
            except ValueError as error:
                parser.error(str(error))


@functools.lru_cache(maxsize=64)
def _sha256(file: Path, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, computed once per (path, size, modification time): a command resolves a folder
    several times."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def output_folder(out, source=None, force: bool = False):
    """Write a model folder all or nothing: yields an empty temporary folder beside ``out`` to write into;
    when the block ends without an error its files replace ``out``'s (the old model's weight shards, their
    index and its manifest removed, so that no stale shard is read and no old hash is checked), and after an
    error ``out`` is as it was. Refuses what `check_output` refuses."""
    out = Path(out)
    check_output(out, source, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp's folder is private
        if out.is_dir():
            # mlx-lm and the loaders here read every model*.safetensors of a folder as weights
            for stale in [*out.glob("model*.safetensors"), *out.glob("model*.safetensors.index.json")]:
                stale.unlink()
            (out / MANIFEST).unlink(missing_ok=True)  # the old model's hashes
            for file in tmp.iterdir():
                os.replace(file, out / file.name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
