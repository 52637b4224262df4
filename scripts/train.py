"""Pretrain a DLA model: `python scripts/train.py --config run.json` or under torchrun (see dla_torch.train)."""

from dla_torch.train import main

if __name__ == "__main__":
    raise SystemExit(main())
