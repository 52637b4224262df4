"""A small corpus every machine has: Python standard library modules as JSONL documents (split into train and
validation by file), plus a byte-level BPE tokenizer trained on the training part. No download.

    python scripts/prepare_tiny.py --files 400 --out data/tiny
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=400, help="standard library files to take")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-chars", type=int, default=20000, help="longer files are cut into documents of this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/tiny")
    args = p.parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in stdlib.glob("*.py") if f.is_file())
    random.Random(args.seed).shuffle(files)
    files = files[: args.files]
    n_valid = max(1, int(len(files) * args.valid_fraction))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"valid": files[:n_valid], "train": files[n_valid:]}
    for name, chosen in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for file in chosen:
                text = file.read_text(encoding="utf-8", errors="replace")
                for start in range(0, len(text), args.max_chars):
                    f.write(json.dumps({"text": text[start : start + args.max_chars], "file": file.name}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = (json.loads(line)["text"] for line in open(out / "train.jsonl"))
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOS],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (out / "tokenizer").mkdir(exist_ok=True)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    # Lets transformers' AutoTokenizer (and so mlx-lm) load it too.
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS}))
    print(f"{len(splits['train'])} train and {n_valid} validation files from {stdlib}; tokenizer "
          f"({tokenizer.get_vocab_size()} tokens) in {out / 'tokenizer'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
