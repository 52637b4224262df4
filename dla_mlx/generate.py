"""Generate with a DLA model on MLX (Metal on a Mac, the CPU elsewhere): `generate`, the mirror of
`dla_torch.generate.generate` through mlx-lm's `generate_step`, and `dla-generate` (`main`), which streams
text as `mlx_lm.generate` does, then prompt and generation speed and peak memory. The state cache stays the
same size however long the text grows.

    dla-generate --prompt "def fibonacci(n):" --boundaries b.png     # the model shipped with the package
    dla-generate --model out/mlx-model --prompt "def main(" --max-tokens 200 --temp 0.7
"""

from __future__ import annotations

import argparse
import math
import sys

import mlx.core as mx
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.sample_utils import make_sampler

from dla_shared.hub import DEFAULT_MODEL, check_output_files
from dla_shared.plot import FIGURE_SUFFIXES

from .convert import load


def generate(model, input_ids, max_new_tokens=64, *, temperature=0.0, top_p=1.0, prefill_step=2048, eos_id=None):
    """Continue ``input_ids`` [T] (one sequence) by up to ``max_new_tokens`` tokens; returns [T + new].

    The prompt is prefilled in slices of ``prefill_step`` tokens; ``temperature`` 0 is greedy, otherwise
    sampling restricted to the top-``top_p`` mass (mlx-lm's sampler; `mx.random.seed` sets its seed). Stops
    after ``eos_id``."""
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be a finite number >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if input_ids.ndim != 1 or input_ids.size == 0:
        raise ValueError(f"input_ids must be one non-empty sequence [T], got shape {list(input_ids.shape)}")
    out = []
    for token, _ in generate_step(input_ids, model, max_tokens=max_new_tokens, prefill_step_size=prefill_step,
                                  sampler=make_sampler(temp=temperature, top_p=top_p)):
        out.append(int(token))
        if out[-1] == eos_id:
            break
    return mx.concatenate([input_ids, mx.array(out, dtype=input_ids.dtype)])


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a checkpoint folder (MLX or torch layout) or Hub "
                   "id; default: the small model shipped with the package, trained on Python's standard library")
    p.add_argument("--prompt", default="", help="the prompt ('-' reads standard input; empty: generate from the "
                   "end-of-document token)")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as it is")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--boundaries", metavar="PNG", help="also show where the state cache opened states over the "
                   "prompt and output (text with '|' marks, and a plot written to PNG)")
    p.add_argument("--boundaries-layer", type=int, help="the layer --boundaries shows (default 0)")
    p.add_argument("--boundaries-head", type=int, help="the head --boundaries shows (default 0)")
    args = p.parse_args(argv)
    if args.boundaries is None and (args.boundaries_layer, args.boundaries_head) != (None, None):
        p.error("--boundaries-layer and --boundaries-head choose what --boundaries shows; give --boundaries PNG")
    check_output_files(p, ("--boundaries", args.boundaries, FIGURE_SUFFIXES))
    args.boundaries_layer, args.boundaries_head = args.boundaries_layer or 0, args.boundaries_head or 0
    checks = {"--max-tokens": (args.max_tokens >= 1, ">= 1"),
              "--temp": (math.isfinite(args.temp) and args.temp >= 0, "a finite number >= 0"),
              "--top-p": (0 < args.top_p <= 1, "in (0, 1]"), "--top-k": (args.top_k >= 0, ">= 0"),
              "--prefill-step-size": (args.prefill_step_size >= 1, ">= 1"),
              "--boundaries-layer": (args.boundaries_layer >= 0, ">= 0"),
              "--boundaries-head": (args.boundaries_head >= 0, ">= 0")}
    for name, (ok, expected) in checks.items():
        if not ok:
            p.error(f"{name} must be {expected}, got {getattr(args, name[2:].replace('-', '_'))}")
    try:
        prompt = sys.stdin.buffer.read().decode("utf-8") if args.prompt == "-" else args.prompt
        prompt.encode("utf-8")  # a non-UTF-8 argument arrives with surrogate escapes
    except UnicodeError:
        p.error("--prompt is not UTF-8 text")
    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        model, tokenizer = load(args.model)
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: MLX's, e.g. of a damaged weights file
        p.error(f"--model {args.model}: {error}")
    if args.boundaries:
        from .models.base import dla_mixers

        mixers = dla_mixers(model)
        if args.boundaries_layer >= len(mixers) or args.boundaries_head >= mixers[0].tau.shape[0]:
            p.error(f"--boundaries-layer {args.boundaries_layer} --boundaries-head {args.boundaries_head}: the model "
                    f"has {len(mixers)} layers of {mixers[0].tau.shape[0]} heads")
    if not args.ignore_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    if not prompt:  # start a new document
        if tokenizer.eos_token_id is None:
            p.error("--prompt is empty and the tokenizer has no end-of-document token to start from")
        prompt = [tokenizer.eos_token_id]
    sampler = make_sampler(args.temp, args.top_p if args.top_p < 1 else 0.0, top_k=args.top_k)
    response, tokens = None, []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                                    prefill_step_size=args.prefill_step_size):
        print(response.text, end="", flush=True)
        tokens.append(int(response.token))
    print()
    if response is not None:
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    if args.boundaries:
        show_boundaries(model, tokenizer, prompt, tokens, args)
    return 0


def show_boundaries(model, tokenizer, prompt, tokens, args):
    from dla_shared import plot_trace

    from .inspect import mark_boundaries, trace_text
    from .models.base import dla_mixers

    ids = (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)) + tokens
    trace = trace_text(model, ids, args.boundaries_layer)
    pieces = [tokenizer.decode([i]) for i in ids]
    print("=" * 10)
    print(f"State boundaries, layer {args.boundaries_layer}, head {args.boundaries_head} ('|' opens a state):")
    print(mark_boundaries(pieces, trace, args.boundaries_head))
    tau = dla_mixers(model)[args.boundaries_layer].tau[args.boundaries_head].item()
    threshold = tau if model.args.dla.policy == "dla" else None
    name = "the default model" if args.model == str(DEFAULT_MODEL) else args.model
    plot_trace(trace, args.boundaries, h=args.boundaries_head, threshold=threshold,
               title=f"{name}: layer {args.boundaries_layer}, head {args.boundaries_head}")
    print(f"wrote {args.boundaries}")


if __name__ == "__main__":
    raise SystemExit(main())
