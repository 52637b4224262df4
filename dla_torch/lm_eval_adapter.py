"""An lm-evaluation-harness model for the PyTorch DLA causal LMs, registered under the name ``dla``.

lm_eval knows a model by name only once the module that registers it has been imported, so run the harness
through this module (every argument is lm_eval's own):

    python -m dla_torch.lm_eval_adapter --model dla --model_args pretrained=runs/dla/model --tasks lambada_openai

Model arguments: ``pretrained`` (a checkpoint folder or Hub id holding tokenizer.json), ``batch_size``
(default 8), ``device`` (default cuda when available), ``dtype`` (float32, bfloat16 or float16),
``seq_len`` (tokens per forward call; the recurrent state carries across calls, so there is no context
limit) and ``max_gen_toks`` (default 256). From Python: import this module, then
``lm_eval.simple_evaluate(model="dla", model_args=...)``, or pass a `DLALM` instance as ``model``.
Needs the ``eval`` extra (lm-eval).

The models are trained without a beginning-of-sequence token; as lm_eval asks, an empty context and
``loglikelihood_rolling`` condition on the end-of-document token instead. So ``loglikelihood_rolling`` scores
every token of a text, while `dla_torch.evaluate.perplexity` (as training) scores a document from its second
token and adds its end-of-document token: the two perplexities of one text differ by those two terms.
"""

from __future__ import annotations

import json

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .evaluate import load, score
from .generate import sample

GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


@register_model("dla")
class DLALM(TemplateLM):
    """A DLA checkpoint behind lm_eval's model interface (see the module docstring for the arguments)."""

    def __init__(self, pretrained, batch_size=8, device=None, dtype="float32", seq_len=2048, max_gen_toks=256):
        super().__init__()
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer (no 'auto'), got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.seq_len, self.max_gen_toks = int(seq_len), int(max_gen_toks)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.text_tokenizer, self.eos_id = load(pretrained, self._device, getattr(torch, dtype))

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs) -> list[int]:
        return self.text_tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def tok_decode(self, tokens) -> str:
        return self.text_tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether greedy decoding gives the continuation, for requests
        ((context, continuation), context ids, continuation ids)."""
        sequences = [context + continuation for _, context, continuation in requests]
        starts = [len(context) for _, context, _ in requests]
        logprob, greedy = score(self.model, sequences, starts, self.seq_len, self.batch_size,
                                progress=not disable_tqdm, desc="loglikelihood")
        answers = [(float(lp), bool(g)) for lp, g in zip(logprob, greedy)]
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False) -> list[float]:
        """log p(every token of each string | the end-of-document token), the whole string at once."""
        strings = [request.args[0] for request in requests]
        sequences = [[self.eot_token_id] + self.tok_encode(s) for s in strings]
        logprob, _ = score(self.model, sequences, [1] * len(sequences), self.seq_len, self.batch_size,
                           progress=not disable_tqdm, desc="loglikelihood_rolling")
        for string, lp in zip(strings, logprob):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), float(lp))
        return [float(lp) for lp in logprob]

    def generate_until(self, requests, disable_tqdm=False) -> list[str]:
        """Continue each context (greedily unless ``do_sample``) until one of its ``until`` strings appears
        (cut off with what follows), the end-of-document token, or ``max_gen_toks`` tokens."""
        groups = {}  # requests with the same generation arguments share batches
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for rows in groups.values():
                gen_kwargs = requests[rows[0]].args[1]
                for first in range(0, len(rows), self.batch_size):
                    batch = rows[first : first + self.batch_size]
                    texts = self._generate([requests[i].args[0] for i in batch], **gen_kwargs)
                    for i, text in zip(batch, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return out

    @torch.no_grad()
    def _generate(self, contexts, until=(), max_gen_toks=None, do_sample=False, temperature=0.0, top_p=1.0,
                  **unknown) -> list[str]:
        """The continuations of a batch of contexts: prompts left-padded to [B, T], then one token per step."""
        if unknown:
            raise ValueError(f"unsupported generation argument(s) {sorted(unknown)}; supported: {sorted(GEN_KWARGS)}")
        until = [until] if isinstance(until, str) else list(until or ())
        max_gen_toks = self.max_gen_toks if max_gen_toks is None else int(max_gen_toks)
        temperature = float(temperature) if do_sample else 0.0
        prompts = [self.tok_encode(c) or [self.eot_token_id] for c in contexts]
        T = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):  # left padding, which the mask keeps out of the state
            ids[i, T - len(p) :] = torch.tensor(p)
            mask[i, T - len(p) :] = True
        cache = self.model.make_cache()
        for s in range(0, T, self.seq_len):
            window = slice(s, s + self.seq_len)
            logits = self.model(ids[:, window], mask=mask[:, window], cache=cache).logits[:, -1]
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_gen_toks):
            token = sample(logits, temperature, float(top_p))
            for i, t in enumerate(token.tolist()):
                if done[i]:
                    continue
                if t == self.eos_id:
                    done[i] = True
                else:
                    new[i].append(t)
                    done[i] = any(stop in self.tok_decode(new[i]) for stop in until)
            if all(done):
                break
            logits = self.model(token[:, None], cache=cache).logits[:, -1]
        return [_cut(self.tok_decode(tokens), until) for tokens in new]


def _cut(text: str, until) -> str:
    """``text`` up to the first occurrence of any of the ``until`` strings."""
    return text[: min([text.find(stop) for stop in until if stop in text], default=len(text))]


def main():
    """lm_eval's command line, with the ``dla`` model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
