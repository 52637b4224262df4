"""Perplexity of a DLA causal LM over text documents, scored as the training program scores them.

    dla-eval --model runs/dla/model --data valid.jsonl [--json results.json]   # --model: default the shipped model

Every document is scored on its own: its tokens followed by the end-of-document token, each token predicted
from the tokens before it (the first token, which has none, is not scored), as in `dla_torch.train`'s
validation loss. A document longer than ``--seq-len`` is read in windows whose recurrent state carries over,
so the windows change nothing: the score is that of the whole document at once.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dla_shared.hub import DEFAULT_MODEL, check_output_files, resolve

from .data import load_tokenizer, read_documents
from .models.hub import from_pretrained

# The training program's default end-of-document token (`dla_torch.train.DEFAULTS`).
DEFAULT_EOS = "<|endoftext|>"


def load(path_or_id, device="cpu", dtype=None):
    """(model in eval mode on ``device``, `tokenizers.Tokenizer`, end-of-document id) from a checkpoint
    folder or Hub id that holds ``tokenizer.json``."""
    folder = resolve(path_or_id)
    model = from_pretrained(folder, dtype).to(device)
    tokenizer = load_tokenizer(folder)
    return model, tokenizer, eos_token_id(tokenizer, folder)


def eos_token_id(tokenizer, folder=None) -> int:
    """The end-of-document token's id: ``eos_token`` of ``folder/tokenizer_config.json`` if there is one,
    else the training default <|endoftext|>."""
    token = DEFAULT_EOS
    config = None if folder is None else Path(folder, "tokenizer_config.json")
    if config is not None and config.exists():
        token = json.loads(config.read_text()).get("eos_token") or DEFAULT_EOS
        token = token["content"] if isinstance(token, dict) else token
    eos = tokenizer.token_to_id(token)
    if eos is None:
        raise ValueError(f"the end-of-document token {token!r} is not in the tokenizer's vocabulary; pass eos_id")
    return eos


@torch.no_grad()
def score(model, sequences, starts, seq_len=512, batch_size=8, progress=False, desc="scoring"):
    """Log-probability of each sequence's tokens from index ``start`` on, each given every token before it.

    ``sequences``: N lists of token ids; ``starts``: N indices (>= 1) of the first scored token. Sequences are
    batched by length (right padding, which follows every scored token and so cannot change it) and read in
    windows of ``seq_len`` tokens that continue the model's cache. Returns (logprob [N] float64, greedy [N]
    bool: every scored token is the model's argmax), on the CPU.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if any(start < 1 for start in starts):
        raise ValueError("starts must be >= 1: the first token of a sequence has nothing to be predicted from")
    model.eval()
    logprob = torch.zeros(len(sequences), dtype=torch.float64)
    greedy = torch.ones(len(sequences), dtype=torch.bool)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: memory fails early
    with tqdm(total=len(sequences), desc=desc, unit="seq", disable=not progress) as bar:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            logprob[rows], greedy[rows] = _score_batch(model, [sequences[i] for i in rows],
                                                       [starts[i] for i in rows], seq_len)
            bar.update(len(rows))
    return logprob, greedy


def _score_batch(model, sequences, starts, seq_len):
    """`score` for one batch of B sequences: (logprob [B] float64, greedy [B] bool)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    # Input position p predicts token p + 1; it counts when that token is real and at or after the start.
    targets = torch.arange(1, ids.shape[1])
    scored = ((targets < lengths[:, None]) & (targets >= torch.tensor(starts)[:, None])).to(device)  # [B, T - 1]
    ids = ids.to(device)
    logprob = torch.zeros(len(sequences), dtype=torch.float64, device=device)
    greedy = torch.ones(len(sequences), dtype=torch.bool, device=device)
    cache = model.make_cache()
    for s in range(0, ids.shape[1] - 1, seq_len):
        e = min(s + seq_len, ids.shape[1] - 1)
        logits = model(ids[:, s:e], cache=cache).logits  # [B, W, V] float32
        target, use = ids[:, s + 1 : e + 1], scored[:, s:e]
        token_logprob = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, W]
        logprob += torch.where(use, token_logprob, 0).double().sum(1)
        greedy &= ((logits.argmax(-1) == target) | ~use).all(1)
    return logprob.cpu(), greedy.cpu()


def perplexity(model, tokenizer, documents, seq_len=512, batch_size=8, eos_id=None, progress=True) -> dict:
    """Token-level mean negative log-likelihood (nats) and perplexity of ``model`` over ``documents`` (strings),
    each scored on its own as its tokens followed by ``eos_id`` (default: <|endoftext|>).

    Returns {"nll", "perplexity", "tokens": the number of scored tokens, "documents"}.
    """
    if not documents:
        raise ValueError("documents is empty: nothing to score")
    eos_id = eos_token_id(tokenizer) if eos_id is None else eos_id
    sequences = [e.ids + [eos_id] for e in tokenizer.encode_batch(list(documents))]
    logprob, _ = score(model, sequences, [1] * len(sequences), seq_len, batch_size, progress, desc="perplexity")
    tokens = sum(len(s) - 1 for s in sequences)
    nll = -float(logprob.sum()) / tokens
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": tokens, "documents": len(sequences)}


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a checkpoint folder (with tokenizer.json) or a Hub "
                   "id; default: the small model shipped with the package")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help=".txt (a whole file is one document), .jsonl or .parquet")
    p.add_argument("--text-field", default="text", help="the documents' field in JSONL / parquet files")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (the state carries across windows)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per batch")
    p.add_argument("--max-documents", type=int, metavar="N", help="score only the first N documents")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "max_documents"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    check_output_files(p, ("--json", args.json, None))
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        p.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    if not Path(args.model).exists() and not _is_hub_id(args.model):
        p.error(f"--model: {args.model} is not a folder (nor a Hub id)")

    try:
        documents = read_documents(args.data, args.text_field)
    except (FileNotFoundError, ValueError) as error:
        p.error(f"--data: {error}")
    documents = documents[: args.max_documents]
    try:
        model, tokenizer, eos = load(args.model, args.device, getattr(torch, args.dtype))
    except (OSError, ValueError) as error:
        p.error(f"--model {args.model}: {error}")

    result = perplexity(model, tokenizer, documents, args.seq_len, args.batch_size, eos)
    print(f"perplexity {result['perplexity']:.2f} (nll {result['nll']:.3f} nats/token) over {result['tokens']:,} "
          f"tokens in {result['documents']:,} documents")
    if args.json:
        record = {"model": args.model, "data": args.data, "seq_len": args.seq_len, **result}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
