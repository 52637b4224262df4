"""Pretrain a DLA causal LM: one process, or many under torchrun (DDP or FSDP2; NCCL on GPUs, gloo on CPU).

    dla-train --config configs/tiny.json                      # one process (GPU if present, else CPU)
    torchrun --nproc-per-node 8 -m dla_torch.train --config run.json --set train.parallel=fsdp

The config file (JSON) names the model, its DLA policy, the data and the schedule (`DEFAULTS` lists every
field); ``--set a.b=value`` overrides one field (value parsed as JSON, else taken as a string). The run
writes to ``out``: ``metrics.jsonl`` (one line per logged step and per validation), resumable checkpoints
``checkpoints/step_N`` (model, optimizer, scheduler and data position, through torch.distributed.checkpoint),
and at the end ``model/`` in the Hugging Face layout (`dla_torch.models.from_pretrained` loads it). A run
restarted with the same ``out`` resumes from its latest checkpoint; ``train.stop_at`` ends a run early
(after a checkpoint) for jobs with a time limit; ``train.resume=false`` starts over, moving a previous run's
files to ``out/previous-*``.

With the ``dla`` policy, every step records each layer's boundary rate (the share of the step's tokens that
opened a state, mean, min and max over heads), and when the model's ``dla.target_rate`` is set, every head's
threshold ``tau`` follows it after each optimizer step: ``tau <- tau * exp(train.tau_eta * (rate - target))``
(DESIGN section 2), with the counts summed over micro-batches and ranks so that every rank holds the same tau.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .data import PackedTokens, load_tokenizer, read_documents
from .models.base import dla_mixers
from .models.hub import model_types, save_pretrained
from .thresholds import follow_target_rate, step_counts

DEFAULTS = {
    "out": "runs/dla",
    "model": {"type": "dla_gated_deltanet", "hidden_size": 256, "num_hidden_layers": 4, "num_heads": 4,
              "head_dim": 64, "dla": {"policy": "dla", "capacity": 30}},
    "data": {"tokenizer": None, "train": [], "valid": [], "valid_fraction": 0.0, "text_field": "text",
             "eos_token": "<|endoftext|>"},
    "train": {"seq_len": 512, "micro_batch": 4, "grad_accum": 1, "steps": 1000, "lr": 1e-3, "min_lr_ratio": 0.1,
              "warmup": 100, "schedule": "cosine", "decay_fraction": 0.2, "weight_decay": 0.1,
              "betas": [0.9, 0.95], "clip": 1.0, "log_every": 10, "eval_every": 200, "eval_rows": 16,
              "save_every": 500, "seed": 0, "parallel": "ddp", "dtype": "bf16", "activation_checkpointing": False,
              "compile": False, "resume": True, "stop_at": None, "tau_eta": 0.1, "deterministic": False},
}
# What a resumed run may change; any other difference from the checkpoint's config is refused.
RESUMABLE = ("train.stop_at", "train.resume", "train.log_every", "train.eval_every", "train.eval_rows",
             "train.save_every", "train.compile", "train.activation_checkpointing", "train.deterministic")
# The train fields that are finite numbers: (test, what the value must be).
NUMBERS = {"lr": (lambda x: x > 0, "a finite number > 0"),
           "min_lr_ratio": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
           "decay_fraction": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
           "weight_decay": (lambda x: x >= 0, "a finite number >= 0"),
           "clip": (lambda x: x > 0, "a finite number > 0 (the gradient norm's bound)"),
           "tau_eta": (lambda x: x > 0, "a finite number > 0 (the threshold controller's step size)")}
# Parameters trained without weight decay besides biases and norms (Log-Linear keeps L out too).
NO_DECAY = ("A_log", "dt_bias", "D", "L")


def load_config(path=None, overrides=()) -> dict:
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        _merge(config, json.loads(Path(path).read_text()), "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        for name in reversed(key.split(".")):
            value = {name: value}
        _merge(config, value, "")
    _check(config)
    return config


def _merge(base: dict, new: dict, where: str):
    """Merge ``new`` into ``base``; names must exist in DEFAULTS, except inside ``model`` (the model's
    config class checks those)."""
    for key, value in new.items():
        if key not in base and not (where + ".").startswith(".model."):
            raise ValueError(f"unknown config field {where[1:] + '.' if where else ''}{key}; "
                             f"expected one of {sorted(base)}")
        if isinstance(base.get(key), dict) and not isinstance(value, dict):
            raise ValueError(f"{where[1:] + '.' if where else ''}{key} must be an object of fields, got {value!r}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def _check(config):
    t = config["train"]
    if t["schedule"] not in ("cosine", "wsd"):
        raise ValueError(f"train.schedule must be 'cosine' or 'wsd', got {t['schedule']!r}")
    if t["parallel"] not in ("ddp", "fsdp"):
        raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {t['parallel']!r}")
    if t["dtype"] not in ("bf16", "fp32"):
        raise ValueError(f"train.dtype must be 'bf16' or 'fp32', got {t['dtype']!r}")
    for name in ("seq_len", "micro_batch", "grad_accum", "steps", "log_every", "eval_every", "eval_rows",
                 "save_every"):
        if not (_number(t[name], int) and t[name] >= 1):
            raise ValueError(f"train.{name} must be a positive integer, got {t[name]!r}")
    if not (_number(t["warmup"], int) and t["warmup"] >= 0):
        raise ValueError(f"train.warmup must be an integer >= 0, got {t['warmup']!r}")
    for name, (ok, what) in NUMBERS.items():
        if not (_number(t[name]) and ok(t[name])):
            raise ValueError(f"train.{name} must be {what}, got {t[name]!r}")
    betas = t["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"train.betas must be two numbers in [0, 1) (AdamW's), got {betas!r}")
    for name in ("activation_checkpointing", "compile", "resume", "deterministic"):
        if not isinstance(t[name], bool):
            raise ValueError(f"train.{name} must be true or false, got {t[name]!r}")
    if t["stop_at"] is not None and not (isinstance(t["stop_at"], int) and 0 < t["stop_at"] < t["steps"]):
        raise ValueError(f"train.stop_at must be a step between 1 and train.steps - 1, got {t['stop_at']!r}")
    fraction = config["data"]["valid_fraction"]
    if not (_number(fraction) and 0 <= fraction < 1):
        raise ValueError(f"data.valid_fraction must be a number in [0, 1), got {fraction!r}")
    if Path(config["out"]).is_file():
        raise ValueError(f"out {config['out']!r} is a file; expected a folder for the run")
    if config["model"].get("type") not in model_types():
        raise ValueError(f"model.type must be one of {sorted(model_types())}, got {config['model'].get('type')!r}")
    if not config["data"]["tokenizer"] or not config["data"]["train"]:
        raise ValueError("data.tokenizer (a folder with tokenizer.json) and data.train (files) are required")


def _number(x, kind=(int, float)) -> bool:
    """Whether a config value is a finite number of ``kind`` (JSON's true and false are not numbers)."""
    return isinstance(x, kind) and not isinstance(x, bool) and math.isfinite(x)


def lr_factor(step: int, t: dict) -> float:
    """Linear warmup, then cosine to ``min_lr_ratio`` or WSD (constant, then linear decay over the last
    ``decay_fraction`` of the steps)."""
    if step < t["warmup"]:
        return (step + 1) / t["warmup"]
    low = t["min_lr_ratio"]
    if t["schedule"] == "cosine":
        progress = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = t["steps"] * (1 - t["decay_fraction"])
    if step < decay_start:
        return 1.0
    return 1 - (1 - low) * min(1.0, (step - decay_start) / max(1, t["steps"] - decay_start))


class Trainer:
    def __init__(self, config: dict):
        self.config = config
        t = self.t = config["train"]
        self.rank, self.world = _init_distributed()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                   else "cpu")
        torch.manual_seed(t["seed"])
        if t["deterministic"]:  # on CUDA: torch's deterministic index_add / scatter_add, and a fixed cuBLAS workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.out = Path(config["out"])
        d = config["data"]
        tokenizer = load_tokenizer(d["tokenizer"])
        eos = tokenizer.token_to_id(d["eos_token"])
        if eos is None:
            raise ValueError(f"data.eos_token {d['eos_token']!r} is not in the tokenizer's vocabulary")
        documents = read_documents(d["train"], d["text_field"])
        valid_docs = read_documents(d["valid"], d["text_field"]) if d["valid"] else []
        if not valid_docs and d["valid_fraction"] > 0:  # the last documents, a fixed split
            cut = len(documents) - max(1, int(len(documents) * d["valid_fraction"]))
            documents, valid_docs = documents[:cut], documents[cut:]
        # A micro-batch is one packed row of micro_batch sequences of seq_len tokens (fewer at document ends).
        rows = lambda docs, seed=None: PackedTokens(docs, tokenizer, eos, t["seq_len"] * t["micro_batch"], seed=seed,
                                                    context=t["seq_len"])
        self.train_rows = rows(documents, t["seed"])
        self.valid_rows = rows(valid_docs) if valid_docs else None

        fields = {k: v for k, v in config["model"].items() if k != "type"}
        fields.setdefault("vocab_size", tokenizer.get_vocab_size())
        cls = model_types()[config["model"]["type"]]
        self.model = cls(cls.config_class.from_dict(fields)).to(self.device)
        self.model.activation_checkpointing = t["activation_checkpointing"]
        self.module = self.model
        dla = self.model.config.dla
        self.mixers = dla_mixers(self.model) if dla.policy == "dla" else []  # they report their boundaries
        self.target_rate = dla.target_rate
        if self.world > 1 and t["parallel"] == "ddp":
            # The only buffers are the thresholds, which every rank updates alike from the same summed counts.
            self.module = torch.nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
        elif self.world > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.layers:
                fully_shard(layer)
            fully_shard(self.model)
        if t["compile"]:
            self.module = torch.compile(self.module)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and n.split(".")[-1] not in NO_DECAY]
        keep = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and n.split(".")[-1] not in NO_DECAY)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                                            {"params": keep, "weight_decay": 0.0}], lr=t["lr"], betas=tuple(t["betas"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, t))
        self.step = 0
        if t["resume"]:
            self.resume()
        else:
            self.set_aside()

    # -- one step -----------------------------------------------------------------------------------
    def loss(self, index: int, rows: PackedTokens):
        ids, labels, cu = (x.to(self.device) for x in rows.row(index))
        autocast = torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" and self.t["dtype"] == "bf16" \
            else nullcontext()
        with autocast:
            logits = self.module(ids, cu_seqlens=cu).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def train_step(self) -> dict:
        t = self.t
        self.module.train()
        total = torch.zeros((), device=self.device)
        boundaries = []  # per micro-batch: every layer's boundaries per head, and its tokens
        for micro in range(t["grad_accum"]):
            index = (self.step * t["grad_accum"] + micro) * self.world + self.rank
            sync = micro == t["grad_accum"] - 1 or not hasattr(self.module, "no_sync")
            with nullcontext() if sync else self.module.no_sync():
                loss = self.loss(index, self.train_rows) / t["grad_accum"]
                loss.backward()
            total += loss.detach()
            if self.mixers:
                boundaries.append(step_counts(self.mixers))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["clip"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": _mean(total), "grad_norm": float(grad_norm),
                  "lr": self.scheduler.get_last_lr()[0]}
        if self.mixers:
            counts = torch.stack(boundaries).sum(0)
            if self.world > 1:  # every rank then holds the same thresholds
                dist.all_reduce(counts)
            rate = follow_target_rate(self.mixers, counts, self.target_rate, t["tau_eta"])
            record["boundary_rate"] = {"mean": rate.mean(1).tolist(), "min": rate.amin(1).tolist(),
                                       "max": rate.amax(1).tolist()}
        return record

    @torch.no_grad()
    def validate(self) -> float:
        self.module.eval()
        n = min(self.t["eval_rows"], len(self.valid_rows))
        losses = [self.loss(i, self.valid_rows) for i in range(self.rank, n, self.world)]
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        if self.world > 1:
            dist.all_reduce(total)
        return float(total) / n

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        folder = self.out / "checkpoints" / f"step_{self.step}"
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        with _single_process_quiet():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
        if self.rank == 0:
            # The data position is the step: rows are addressed by (step, micro-batch, rank).
            trainer = {"step": self.step, "scheduler": self.scheduler.state_dict(), "world": self.world,
                       "config": self.config}
            # trainer.json last: a checkpoint folder without it is incomplete (`checkpoints`).
            _write_atomically(folder / "trainer.json", json.dumps(trainer, indent=2))
            _write_atomically(self.out / "checkpoints" / "latest", folder.name)
        _barrier(self.world)

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, the one ``latest`` names first, then the others newest first."""
        folder = self.out / "checkpoints"
        found = sorted((f for f in folder.glob("step_*") if (f / "trainer.json").exists() and f.name[5:].isdigit()),
                       key=lambda f: -int(f.name[5:]))
        latest = folder / "latest"
        named = folder / latest.read_text().strip() if latest.exists() else None
        return sorted(found, key=lambda f: f != named)

    def resume(self):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        for folder in self.checkpoints():
            trainer = json.loads((folder / "trainer.json").read_text())
            _check_same_run(trainer["config"], self.config, folder)
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optim": optim_state}
            try:
                with _single_process_quiet():
                    dcp.load(state, checkpoint_id=str(folder))
            except (Exception, CheckpointException) as error:  # a damaged checkpoint: fall back to an older one
                warnings.warn(f"checkpoint {folder} does not load ({type(error).__name__}: {error}); "
                              "trying an older one")
                continue
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            self.scheduler.load_state_dict(trainer["scheduler"])
            self.step = trainer["step"]
            self.log({"event": "resumed", "step": self.step, "from": str(folder)})
            return

    def set_aside(self):
        """train.resume=false: a previous run's checkpoints, metrics and model in ``out`` move to
        ``out/previous-<time>-<random>``, so that the new run neither mixes its metrics with them nor resumes
        from them later; nothing is deleted."""
        old = [self.out / name for name in ("checkpoints", "metrics.jsonl", "model") if (self.out / name).exists()]
        if old and self.rank == 0:
            aside = Path(tempfile.mkdtemp(prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.out))
            aside.chmod(0o755)  # mkdtemp's folder is private
            for path in old:
                os.replace(path, aside / path.name)
            print(f"train.resume=false: the previous run's {', '.join(p.name for p in old)} moved to {aside}",
                  file=sys.stderr)
        _barrier(self.world)

    def export(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            model = type(self.model)(self.model.config)
            model.load_state_dict(state)
            save_pretrained(model, self.out / "model", tokenizer_dir=self.config["data"]["tokenizer"])
        _barrier(self.world)

    # -- the loop -------------------------------------------------------------------------------------
    def log(self, record: dict):
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> list[dict]:
        t = self.t
        history = []
        bar = tqdm(total=t["steps"], initial=self.step, disable=self.rank != 0, desc="train", unit="step")
        tokens_per_step = t["seq_len"] * t["micro_batch"] * t["grad_accum"] * self.world
        while self.step < t["steps"]:
            start = time.perf_counter()
            record = self.train_step()
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - start)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **_rate_summary(record))
            if self.step % t["log_every"] == 0 or self.step == t["steps"]:
                self.log(record)
            if self.valid_rows is not None and (self.step % t["eval_every"] == 0 or self.step == t["steps"]):
                valid = {"step": self.step, "valid_loss": self.validate()}
                self.log(valid)
                bar.write(f"step {self.step}: validation loss {valid['valid_loss']:.4f}")
            if self.step % t["save_every"] == 0 or self.step in (t["steps"], t["stop_at"]):
                self.save()
            if self.step == t["stop_at"]:  # a job with a time limit: the next run resumes from here
                bar.close()
                return history
        bar.close()
        self.export()
        return history


def _check_same_run(stored: dict, config: dict, folder: Path):
    """Refuse to resume a run whose config differs from the checkpoint's, except for `RESUMABLE` fields."""
    flat = lambda d, at="": {k: v for key, x in d.items() for k, v in
                             (flat(x, f"{at}{key}.").items() if isinstance(x, dict) else [(f"{at}{key}", x)])}
    old, new = flat(stored), flat(json.loads(json.dumps(config)))
    changed = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(old.keys() | new.keys())
               if k not in RESUMABLE and old.get(k) != new.get(k)]
    if changed:
        raise ValueError(f"{config['out']} holds a run with another config (checkpoint {folder.name}): "
                         f"{'; '.join(changed)}. Resume with the same config (only {', '.join(RESUMABLE)} may "
                         "change), choose a new out, or set train.resume=false to start over")


def _write_atomically(file: Path, text: str):
    """Write, flush to disk, then rename over ``file``: a crash leaves the old file or the new one."""
    partial = file.with_name(file.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, file)


def _rate_summary(record: dict) -> dict:
    """The progress bar's boundary rate: the mean over all layers and heads, and the extremes."""
    if "boundary_rate" not in record:
        return {}
    rate = record["boundary_rate"]
    mean = sum(rate["mean"]) / len(rate["mean"])
    return {"rate": f"{mean:.3f} [{min(rate['min']):.3f}, {max(rate['max']):.3f}]"}


def _init_distributed():
    if "RANK" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it saves in a single process when no group exists: as meant."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _mean(x: torch.Tensor) -> float:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def _barrier(world):
    if world > 1:
        dist.barrier()


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a JSON file (fields as in dla_torch.train.DEFAULTS)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    history = trainer.fit()
    steps = config["train"]["steps"]
    if trainer.rank == 0:
        if trainer.step < steps:
            print(f"stopped at step {trainer.step} of {steps} (train.stop_at); run again with the same out and "
                  f"config to resume: checkpoints in {trainer.out / 'checkpoints'}")
        elif history:
            print(f"trained {trainer.step} steps; last loss {history[-1]['loss']:.4f}; "
                  f"model in {trainer.out / 'model'}")
        else:
            print(f"{trainer.out} holds a finished run of {steps} steps: nothing to train (model in "
                  f"{trainer.out / 'model'}); choose a new out, or set train.resume=false to start over")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
