"""Cached generation in PyTorch: the prompt in slices (chunked prefill), then one token per step."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, input_ids, max_new_tokens=64, *, temperature=0.0, top_p=1.0, mask=None, prefill_step=2048,
             eos_id=None, generator=None):
    """Continue ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens; returns [B, T + new].

    ``mask`` [B, T] bool marks the prompt's real tokens (left padding for prompts of different lengths).
    ``temperature`` 0 is greedy; otherwise sampling from the softmax, restricted to the top-``top_p`` mass.
    Every state stays the size of DLA's cache however long the text grows. Stops early when every row
    has produced ``eos_id``.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    model.eval()
    cache = model.make_cache()
    B, T = input_ids.shape
    logits = None
    for start in range(0, T, prefill_step):
        part = None if mask is None else mask[:, start : start + prefill_step]
        logits = model(input_ids[:, start : start + prefill_step], mask=part, cache=cache).logits[:, -1]
    out, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        out.append(token[:, None])
        if eos_id is not None:
            done |= token == eos_id
            if done.all():
                break
        logits = model(token[:, None], cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """One token per row from logits [B, V]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
