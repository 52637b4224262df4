"""What `dla-calibrate` and `dla-inspect` share: a DLA checkpoint folder of either layout (torch, or MLX as
`dla-convert` writes it) loaded as a torch model, sample text tokenized as the model reads documents, the
inputs of one layer's DLA op recorded over that text, and the per-head thresholds ``tau`` written back into
the folder's weights files (everything else in the folder stays as it was).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dla_shared import DLAConfig
from dla_shared.hub import check_output, read_config, resolve

from .data import load_tokenizer, read_documents
from .evaluate import eos_token_id
from .models.base import dla_mixers
from .models.hub import from_pretrained, model_types


@dataclasses.dataclass
class Checkpoint:
    """A DLA checkpoint folder and its model, loaded in float32 on the CPU in eval mode."""

    folder: Path
    layout: str  # "torch" or "mlx": how the folder stores its weights
    model: torch.nn.Module
    tokenizer: object  # a `tokenizers.Tokenizer`
    eos_id: int

    def thresholds(self) -> np.ndarray:
        """Every layer's per-head thresholds ``tau``: float32 [layers, H]."""
        return np.stack([mixer.tau.detach().cpu().numpy() for mixer in dla_mixers(self.model)])


def load_checkpoint(path_or_id) -> Checkpoint:
    """Load a ``dla_mamba2`` or ``dla_gated_deltanet`` checkpoint with ``policy="dla"`` (a local folder or a
    Hub id, with its tokenizer), whichever backend's layout it is in."""
    folder = resolve(path_or_id)
    config = read_config(folder)
    if config.get("model_type") not in model_types():
        raise ValueError(f"{folder} holds model_type {config.get('model_type')!r}, not a DLA model (one of "
                         f"{sorted(model_types())}); dla-upcycle turns Mamba-2 and Gated DeltaNet checkpoints into one")
    policy = config.get("dla", {}).get("policy", DLAConfig.policy)
    if policy != "dla":
        raise ValueError(f"{folder} uses policy {policy!r}; boundary thresholds exist only under policy 'dla'")
    if "quantization" in config:
        raise ValueError(f"{folder} is a quantized MLX model; use the unquantized one (and quantize afterwards "
                         "with dla-convert --quantize)")
    layout = weights_layout(folder)
    if layout == "torch":
        model = from_pretrained(folder)
    else:
        from dla_mlx.convert import mlx_to_torch

        with tempfile.TemporaryDirectory() as converted:
            mlx_to_torch(folder, converted)
            model = from_pretrained(converted)
    tokenizer = load_tokenizer(folder)
    return Checkpoint(folder, layout, model.float(), tokenizer, eos_token_id(tokenizer, folder))


def weights_layout(folder) -> str:
    """How ``folder`` stores its weights, "torch" or "mlx", told by the depthwise convolution weights: torch
    stores them [C, 1, W], MLX [C, W, 1]."""
    for file in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("conv1d.weight"):
                    return "mlx" if f.get_slice(name).get_shape()[-1] == 1 else "torch"
    raise FileNotFoundError(f"no convolution weights in {folder}/model*.safetensors: not a DLA checkpoint")


@dataclasses.dataclass
class Text:
    """Sample text as the model reads it: documents, each followed by the end-of-document token, packed in one
    row. ids [T] int64, cu_seqlens [N + 1] (document starts)."""

    ids: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def scored_tokens(self) -> int:
        """Tokens after each document's first: the denominator of an open rate."""
        return len(self.ids) - (len(self.cu_seqlens) - 1)


def read_text(files, tokenizer, eos_id: int, max_tokens: int | None = None, text_field: str = "text") -> Text:
    """The documents of ``files`` (text or JSONL, as `dla_torch.data.read_documents` reads them), tokenized and
    cut after ``max_tokens`` tokens. A file without text is an error that names it."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    documents = [d for file in files for d in read_documents([file], text_field) if d.strip()]  # kinds may mix
    pieces, total = [], 0
    for encoding in tokenizer.encode_batch(documents):
        ids = (encoding.ids + [eos_id])[: None if max_tokens is None else max_tokens - total]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    text = Text(torch.cat(pieces), torch.tensor([0] + [len(p) for p in pieces]).cumsum(0))
    if text.scored_tokens == 0:
        raise ValueError(f"data files {[str(f) for f in files]} give {total} tokens in {len(pieces)} documents: no "
                         "token after a document's first, so no open rate to measure")
    return text


@dataclasses.dataclass
class OpInputs:
    """One layer's DLA op inputs over a `Text`, on the host in float64: q, k [1, T, H, Dk], v [1, T, H, Dv],
    g and beta (None for the diagonal transition) [1, T, H]; the op's config and the text's cu_seqlens."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    g: np.ndarray
    beta: np.ndarray | None
    config: DLAConfig
    cu_seqlens: np.ndarray

    @property
    def num_heads(self) -> int:
        return self.k.shape[2]

    def rows(self) -> dict:
        """The documents as rows of a batch (what `dla_shared.calibrate` takes): k, v, g, beta
        [N, T_max, H, ...] padded at the end, and mask [N, T_max] bool (False = padding)."""
        bounds = list(zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]))
        length = max(e - s for s, e in bounds)
        mask = np.zeros((len(bounds), length), bool)
        rows = {"mask": mask}
        for name in ("k", "v", "g", "beta"):
            x = getattr(self, name)
            if x is None:
                rows[name] = None
                continue
            rows[name] = np.zeros((len(bounds), length, *x.shape[2:]))
            for i, (s, e) in enumerate(bounds):
                rows[name][i, : e - s] = x[0, s:e]
        for i, (s, e) in enumerate(bounds):
            mask[i, : e - s] = True
        return rows


class _Recorded(Exception):
    """Ends a forward pass once the layer asked for has been recorded."""


@torch.no_grad()
def record_layer(model, text: Text, layer: int) -> OpInputs:
    """Run ``model`` over ``text`` up to ``layer`` (the earlier layers with their current thresholds) and return
    the inputs of that layer's DLA op, with the layer's config and thresholds ``tau``."""
    mixers = dla_mixers(model)
    if not 0 <= layer < len(mixers):
        raise ValueError(f"layer must be in [0, {len(mixers)}), got {layer}")
    mixer, found = mixers[layer], {}

    def record(q, k, v, g, lam, beta=None, **kw):  # stands in for `DLAMixer.attend`
        host = lambda x: None if x is None else x.detach().to(torch.float64).cpu().numpy()
        found.update(q=host(q), k=host(k), v=host(v), g=host(g), beta=host(beta))
        raise _Recorded

    mixer.attend = record
    try:
        with contextlib.suppress(_Recorded):
            model(text.ids[None], cu_seqlens=text.cu_seqlens)
    finally:
        del mixer.attend
    config = mixer.op_config()
    return OpInputs(**found, config=config, cu_seqlens=text.cu_seqlens.numpy())


def check_copy(checkpoint: Checkpoint, out) -> bool:
    """Whether `save_thresholds` writes a copy to ``out``; refuses an ``out`` that would overwrite another
    model (it must be new or empty, and not a file or inside the checkpoint's folder)."""
    if out is None or Path(out).resolve() == Path(checkpoint.folder).resolve():
        return False
    check_output(out, checkpoint.folder)
    return True


def save_thresholds(checkpoint: Checkpoint, out=None) -> Path:
    """Write the model's ``tau`` tensors (float32 [H] per layer, named as in its state dict) into the weights
    files of ``out`` (a copy of the checkpoint folder) or, without ``out``, of the folder itself. Every other
    tensor and file stays as it is, so a torch folder stays a torch folder and an MLX folder an MLX folder,
    but for a ``manifest.json`` (`dla_shared.hub.verify`), which described the model before and goes."""
    folder = Path(checkpoint.folder)
    if check_copy(checkpoint, out):
        shutil.copytree(folder, out, dirs_exist_ok=True)
        folder = Path(out)
    taus = {name: t.detach().cpu().float().contiguous() for name, t in checkpoint.model.state_dict().items()
            if name.endswith(".tau")}
    files = sorted(folder.glob("model*.safetensors"))
    contents = {file: load_file(file) for file in files}
    for name, tau in taus.items():
        holder = next((f for f, c in contents.items() if name in c), None)
        if holder is None:  # a checkpoint made before tau: it goes with the layer's read-weight scale L
            sibling = name[: -len("tau")] + "L"
            holder = next((f for f, c in contents.items() if sibling in c), files[0])
        contents[holder][name] = tau
    for file, tensors in contents.items():
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
        partial = file.with_name(file.name + ".partial")  # the tensors may still be mapped from ``file``
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, file)
    (folder / "manifest.json").unlink(missing_ok=True)  # its hashes and numbers are the model's before
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({name: f.name for f, c in contents.items() for name in taus if name in c})
        index.write_text(json.dumps(data, indent=2))
    return folder
