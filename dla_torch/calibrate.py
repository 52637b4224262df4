"""Set every head's boundary threshold so that it opens states at a target rate over sample text
(DESIGN section 2: pretrained, upcycled or imported models are calibrated, trained models follow their
target rate in training).

    dla-calibrate out/dla-model --data sample.txt --rate 0.125                   # writes tau in place
    dla-calibrate out/mlx-model --data docs.jsonl --rate 0.25 --out out/mlx-calibrated

Layer by layer, in order (a layer's thresholds change the next layer's inputs): the layer's op inputs are
recorded over the text with the earlier layers already calibrated, and every head's ``tau`` is bisected in
log space on the real decisions (`dla_shared.calibrate`) until its open rate (tokens after each document's
first that open a state, as `DLAState.opened` counts) is the target. The model is written back in the
layout it came in (torch or MLX folder) with ``tau`` in its weights; config.json is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dla_shared.calibrate import fit_thresholds, open_rates

from .boundaries import Checkpoint, Text, check_copy, load_checkpoint, read_text, record_layer, save_thresholds
from .models.base import dla_mixers

TOLERANCE = 0.1  # how far (relative) a head's open rate may land from the target
DEFAULT_MAX_TOKENS = 2048
DEFAULT_STEPS = 20


@dataclasses.dataclass
class Calibration:
    """What calibration reached: ``tau`` float32 [layers, H] and each head's open rate there, ``rates``
    float64 [layers, H], over ``text``."""

    target: float
    tau: np.ndarray
    rates: np.ndarray
    text: Text

    @property
    def missed(self) -> list[tuple[int, int]]:
        """(layer, head) of every head whose rate is not within `TOLERANCE` of the target."""
        return [tuple(map(int, x)) for x in np.argwhere(np.abs(self.rates / self.target - 1) > TOLERANCE)]

    def table(self) -> str:
        """One line per layer: its heads' open rates (mean, min, max), thresholds and how many hit the target."""
        lines = [f"target open rate {self.target:g} over {self.text.scored_tokens:,} tokens "
                 f"({len(self.text.cu_seqlens) - 1} documents)",
                 f"{'layer':>5} {'mean':>7} {'min':>7} {'max':>7} {'tau min':>9} {'tau max':>9}  "
                 f"within {TOLERANCE:.0%}"]
        for layer, (rates, tau) in enumerate(zip(self.rates, self.tau)):
            hits = int((np.abs(rates / self.target - 1) <= TOLERANCE).sum())
            lines.append(f"{layer:>5} {rates.mean():>7.4f} {rates.min():>7.4f} {rates.max():>7.4f} "
                         f"{tau.min():>9.4g} {tau.max():>9.4g}  {hits}/{len(rates)}")
        if self.missed:
            heads = ", ".join(f"layer {l} head {h} ({self.rates[l, h]:.4f})" for l, h in self.missed)
            lines.append(f"not within {TOLERANCE:.0%} (the closest threshold found is kept): {heads}")
        return "\n".join(lines)


def calibrate(checkpoint: Checkpoint, text: Text, rate: float, steps: int = DEFAULT_STEPS,
              progress: bool = True) -> Calibration:
    """Set the thresholds of ``checkpoint.model`` (its layers' ``tau``, in place) for open rate ``rate``
    over ``text``; ``steps`` bisection steps per layer."""
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    mixers = dla_mixers(checkpoint.model)
    taus, rates = [], []
    with tqdm(total=len(mixers) * steps, desc="calibrating", unit="step", disable=not progress) as bar:
        for layer, mixer in enumerate(mixers):
            bar.set_postfix(layer=layer)
            inputs = record_layer(checkpoint.model, text, layer)
            rows = inputs.rows()
            tau, _ = fit_thresholds(inputs.config, rate, **rows, steps=steps, progress=lambda _: bar.update())
            tau = tau.astype(np.float32)  # as the weights hold it; measured again at exactly that value
            rates.append(open_rates(dataclasses.replace(inputs.config, threshold=tuple(tau.tolist())), **rows))
            with torch.no_grad():
                mixer.tau.copy_(torch.from_numpy(tau))
            taus.append(tau)
    return Calibration(rate, np.stack(taus), np.stack(rates), text)


def calibrate_folder(model, data, rate: float, out=None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                     steps: int = DEFAULT_STEPS, text_field: str = "text", progress: bool = True) -> Calibration:
    """`calibrate` a checkpoint folder (either layout) or Hub id over the documents of ``data``, and write it
    to ``out`` (a copy) or, without ``out``, back into the folder."""
    if out is None and not Path(model).is_dir():
        raise ValueError(f"{model} is not a local folder: give an output folder for the calibrated model")
    checkpoint = load_checkpoint(model)
    check_copy(checkpoint, out)  # before the work
    text = read_text(data, checkpoint.tokenizer, checkpoint.eos_id, max_tokens, text_field)
    result = calibrate(checkpoint, text, rate, steps, progress)
    save_thresholds(checkpoint, out)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-calibrate", description=__doc__.split("\n\n")[0],
                                epilog=f"Exit status 1 if a head could not be brought within {TOLERANCE:.0%} of "
                                       "the target (the closest threshold found is written).")
    p.add_argument("model", metavar="MODEL", help="a DLA checkpoint folder (torch, or MLX from dla-convert) or Hub id, "
                                 "with policy 'dla' and a tokenizer")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help=".txt (a whole file is one document) "
                   "or .jsonl files of sample text")
    p.add_argument("--rate", required=True, type=float, help="the target open rate, in (0, 1): the share of "
                   "tokens that open a state, per head")
    p.add_argument("--out", help="write the calibrated model here (default: into MODEL itself)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"read at most N tokens of the data (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"bisection steps per layer (default {DEFAULT_STEPS})")
    p.add_argument("--text-field", default="text", help="the documents' field in JSONL files")
    args = p.parse_args(argv)
    if not 0 < args.rate < 1:
        p.error(f"--rate must be in (0, 1), got {args.rate}")
    for name in ("max_tokens", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.out is None and not Path(args.model).is_dir():
        p.error(f"--out is needed: {args.model} is not a local folder to write into")
    try:
        checkpoint = load_checkpoint(args.model)
    except (OSError, ValueError) as error:
        p.error(f"model {args.model}: {error}")
    try:
        check_copy(checkpoint, args.out)
    except (OSError, ValueError) as error:
        p.error(f"--out: {error}")
    try:
        text = read_text(args.data, checkpoint.tokenizer, checkpoint.eos_id, args.max_tokens, args.text_field)
    except (OSError, ValueError) as error:
        p.error(f"--data: {error}")
    if args.out is None:
        print(f"no --out: the thresholds will be written into {checkpoint.folder} itself")
    result = calibrate(checkpoint, text, args.rate, args.steps)
    print(result.table())
    folder = save_thresholds(checkpoint, args.out)
    print(f"wrote {folder} ({checkpoint.layout} layout), tau per layer and head in its weights")
    return 1 if result.missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
