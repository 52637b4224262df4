"""Where a DLA model opens states over sample text: per layer and head, the open rate, the mean span length,
the share of tokens that triggered a merge, and score quantiles; as a table, JSON and a heatmap.

    dla-inspect out/dla-model --data sample.txt --json stats.json --png rates.png
    dla-inspect out/dla-model --data sample.txt --text --layer 1 --head 2     # '|' before each boundary

Each layer's op inputs are recorded over the text (documents read as the model reads them) and replayed
through the float64 oracle `dla_shared.inspect` with the layer's thresholds ``tau``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dla_shared import Trace, inspect
from dla_shared.hub import check_output_files
from dla_shared.plot import FIGURE_SUFFIXES, pyplot

from .boundaries import Checkpoint, Text, load_checkpoint, read_text, record_layer

DEFAULT_MAX_TOKENS = 2048
QUANTILES = (5, 50, 95)


def head_stats(trace: Trace, head: int = 0) -> dict:
    """One head's statistics over a trace of whole sequences (each starting with an empty cache):

    open_rate    share of tokens after each sequence's first that opened a state (`DLAState.opened`)
    mean_span    tokens per opened state (each sequence's first state included)
    merge_share  share of tokens whose new state made two states merge (the cache was full)
    score_qNN    the NN% quantile of the scores of the tokens after each sequence's first
    """
    tokens = trace.pos >= 0
    later = trace.pos > 0
    opened, score = trace.opened[..., head], trace.score[..., head]
    stats = {"open_rate": float(opened[later].sum() / later.sum()),
             "mean_span": float(tokens.sum() / opened[tokens].sum()),
             "merge_share": float((trace.merge_slot[..., head][tokens] >= 0).mean())}
    for q, value in zip(QUANTILES, np.percentile(score[later], QUANTILES)):
        stats[f"score_q{q:02d}"] = float(value)
    return stats


def inspect_model(checkpoint: Checkpoint, text: Text, keep: tuple[int, int] | None = None, progress: bool = True):
    """Every layer's and head's `head_stats` over ``text``: a list (one per layer) of lists (one dict per head,
    with its ``tau``). With ``keep = (layer, head)``, also returns that head's `Trace` (else None)."""
    layers, kept = [], None
    thresholds = checkpoint.thresholds()
    with tqdm(total=thresholds.size, desc="inspecting", unit="head", disable=not progress) as bar:
        for layer, taus in enumerate(thresholds):
            inputs = record_layer(checkpoint.model, text, layer)
            heads = []
            for h, tau in enumerate(taus.tolist()):
                one = lambda x: None if x is None else x[:, :, h : h + 1]
                trace = inspect(one(inputs.q), one(inputs.k), one(inputs.v), one(inputs.g), one(inputs.beta),
                                config=dataclasses.replace(inputs.config, threshold=tau),
                                cu_seqlens=inputs.cu_seqlens)
                heads.append({"head": h, "tau": tau, **head_stats(trace)})
                if keep == (layer, h):
                    kept = trace
                bar.update()
            layers.append(heads)
    return layers, kept


def table(layers: list[list[dict]]) -> str:
    """The statistics as text, one line per layer and head."""
    quantiles = "".join(f"{f'score {q}%':>10}" for q in QUANTILES)
    lines = [f"{'layer':>5} {'head':>4} {'tau':>9} {'open rate':>10} {'mean span':>10} {'merges':>8}{quantiles}"]
    for layer, heads in enumerate(layers):
        for s in heads:
            values = "".join(f"{s[f'score_q{q:02d}']:>10.4g}" for q in QUANTILES)
            lines.append(f"{layer:>5} {s['head']:>4} {s['tau']:>9.4g} {s['open_rate']:>10.4f} {s['mean_span']:>10.2f} "
                         f"{s['merge_share']:>8.4f}{values}")
    return "\n".join(lines)


def plot_open_rates(layers: list[list[dict]], path, title: str = "") -> None:
    """Write a PNG heatmap of the open rate, layers x heads, each cell annotated with its value."""
    plt = pyplot()
    rates = np.array([[s["open_rate"] for s in heads] for heads in layers])
    L, H = rates.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * H, 1.5 + 0.5 * L))
    image = ax.imshow(rates, cmap="viridis", vmin=0, vmax=max(rates.max(), 1e-9), aspect="auto")
    for (layer, h), rate in np.ndenumerate(rates):
        color = "black" if rate > 0.6 * rates.max() else "white"
        ax.text(h, layer, f"{rate:.3f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="open rate")
    ax.set_title(title or "open rate per layer and head", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="a DLA checkpoint folder (torch, or MLX from dla-convert) or Hub id, "
                                 "with policy 'dla' and a tokenizer")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help=".txt (a whole file is one document) "
                   "or .jsonl files of sample text")
    p.add_argument("--json", metavar="OUT", help="also write the statistics to this JSON file")
    p.add_argument("--png", metavar="OUT", help="also draw the open rates (layers x heads) to this PNG file")
    p.add_argument("--text", action="store_true", help="print the text with '|' before each token where --layer's "
                   "--head opened a state")
    p.add_argument("--layer", type=int, help="the layer --text shows (default 0)")
    p.add_argument("--head", type=int, help="the head --text shows (default 0)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"read at most N tokens of the data (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--text-field", default="text", help="the documents' field in JSONL files")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if not args.text and (args.layer, args.head) != (None, None):
        p.error("--layer and --head choose what --text shows; give --text")
    check_output_files(p, ("--json", args.json, None), ("--png", args.png, FIGURE_SUFFIXES))
    args.layer, args.head = args.layer or 0, args.head or 0
    try:
        checkpoint = load_checkpoint(args.model)
    except (OSError, ValueError) as error:
        p.error(f"model {args.model}: {error}")
    layers, heads = checkpoint.thresholds().shape
    for name, value, count in (("layer", args.layer, layers), ("head", args.head, heads)):
        if not 0 <= value < count:
            p.error(f"--{name} must be in [0, {count}), got {value}")
    try:
        text = read_text(args.data, checkpoint.tokenizer, checkpoint.eos_id, args.max_tokens, args.text_field)
    except (OSError, ValueError) as error:
        p.error(f"--data: {error}")

    stats, trace = inspect_model(checkpoint, text, (args.layer, args.head) if args.text else None)
    print(f"{args.model}: {text.scored_tokens:,} tokens after the first of {len(text.cu_seqlens) - 1} documents, "
          f"score {checkpoint.model.config.dla.score}")
    print(table(stats))
    if args.json:
        report = {"model": str(args.model), "data": [str(f) for f in args.data], "tokens": text.scored_tokens,
                  "documents": len(text.cu_seqlens) - 1, "score": checkpoint.model.config.dla.score,
                  "layers": [{"layer": layer, "heads": heads} for layer, heads in enumerate(stats)]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.png:
        plot_open_rates(stats, args.png, f"{Path(args.model).name}: open rate per layer and head "
                                         f"({text.scored_tokens:,} tokens)")
    if args.text:
        from dla_mlx.inspect import mark_boundaries

        pieces = [checkpoint.tokenizer.decode([i]) for i in text.ids.tolist()]
        print(f"\nlayer {args.layer}, head {args.head} ('|' opens a state):")
        print(mark_boundaries(pieces, trace))  # the trace holds that one head
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
