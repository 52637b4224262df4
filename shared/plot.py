"""Pictures of what the cache did: `plot_trace` draws one (row, head) of a `Trace`."""

from __future__ import annotations

import numpy as np

from .oracle import Trace


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The picture formats of matplotlib's Agg backend that the CLIs write (by the file's suffix).
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def plot_trace(trace: Trace, path, b: int = 0, h: int = 0, threshold=None, title: str = ""):
    """Write a PNG: the score per token (with the threshold: one number, or one per head of which head
    ``h``'s is drawn), the number of states, and the slot map slot_t(s) (which state each past token s sits
    in at time t) with the boundaries marked."""
    plt = pyplot()
    idx = np.flatnonzero(trace.pos[b] >= 0)
    score, occupancy = trace.score[b, idx, h], trace.occupancy[b, idx, h]
    opened = np.flatnonzero(trace.opened[b, idx, h])
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [1, 0.7, 2.5]})
    axes[0].plot(score, ".-", color="black", lw=0.8, ms=3, label="score I_t")
    if threshold is not None:
        threshold = float(np.broadcast_to(threshold, trace.score.shape[-1:])[h])
        axes[0].axhline(threshold, color="red", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("score")
    if len(score) and np.nanmax(score) > 100 * max(np.nanmedian(score), 1e-12):  # heavy tails (a near-empty state)
        axes[0].set_yscale("log")
    axes[1].step(np.arange(len(idx)), occupancy, where="mid", color="C0")
    axes[1].set_ylabel("states")
    slots = np.ma.masked_less(trace.slot_map(b, h).T.astype(float), 0)
    image = axes[2].imshow(slots, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=axes[2], orientation="horizontal", pad=0.12, fraction=0.05, label="slot (0 = newest)")
    axes[2].set_ylabel("source token s")
    axes[2].set_xlabel("time t")
    for ax in axes:
        for t in opened:
            ax.axvline(t - 0.5, color="gray", ls=":", lw=0.6)
    fig.suptitle(title or f"cache of row {b}, head {h} (dotted: a state opened)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
