"""The one training loop, used by every method.

Adam, a step-decay or reduce-on-plateau schedule (optionally stopping once the learning rate has
reached its floor and stops changing), validation on held-out classes every ``val_every`` steps,
best/last checkpoints written atomically, exact resume (model, optimiser, scheduler, RNG and sampler
state), a tqdm progress bar, and metrics in ``metrics.csv`` / ``metrics.jsonl`` of the run directory.
Ctrl-C saves ``last.pt`` before stopping, so ``--resume`` continues from there.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .episodes import EpisodeSampler
from .errors import FewshotError
from .evaluate import evaluate
from .models import set_channels_last
from .precision import autocast

SCHEDULES = ("step", "plateau", "linear", "none")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
CSV_FIELDS = ["step", "kind", "loss", "acc", "lr", "val_acc", "val_ci", "val_loss", "elapsed_s"]


@dataclass
class TrainConfig:
    episodes: int = 2000            #: optimiser steps (each on a batch of ``batch`` tasks)
    lr: float = 1e-3
    optimizer: str = "adam"         #: adam | sgd (plain SGD: Reptile's outer step is SGD with lr epsilon) | rmsprop
    momentum: float = 0.0           #: sgd / rmsprop momentum (the NTM's RMSprop uses 0.9)
    weight_decay: float = 0.0
    schedule: str = "step"          #: step | plateau | linear (to 0 at the last step) | none
    step_size: int = 2000           #: step schedule: multiply the lr by ``gamma`` every this many steps
    gamma: float = 0.5
    patience: int = 3               #: plateau schedule: validations without improvement before decaying
    min_lr: float = 1e-6
    stop_at_min_lr: bool = False    #: plateau schedule: stop once the lr is at its floor and stops changing
    val_every: int = 500            #: validate every this many steps (0: never)
    val_episodes: int = 200
    ckpt_every: int = 500           #: write last.pt every this many steps (and at the end)
    grad_clip: float = 0.0          #: clip the gradient norm (0: off)
    grad_clip_value: float = 0.0    #: clip each gradient component to [-v, v] (0: off; the NTM uses 10)
    log_every: int = 10             #: metric rows every this many steps
    precision: str = "fp32"         #: fp32 | bf16 (resolved from "auto" by the caller)
    channels_last: bool = False
    seed: int = 0                   #: seeds torch's global RNG (dropout, init) at the start of a run
    time_limit_s: float = 0.0       #: stop once this much training time has passed (0: no limit)

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise FewshotError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise FewshotError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.episodes < 1:
            raise FewshotError("episodes must be at least 1")


@dataclass
class TrainResult:
    steps: int
    best_val: float
    train_time_s: float
    stopped_early: bool
    out: str


def make_optimizer(method, cfg: TrainConfig):
    params = [p for p in method.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg: TrainConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.gamma,
                                                          patience=cfg.patience, min_lr=cfg.min_lr)
    if cfg.schedule == "linear":
        n = cfg.episodes
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / n))
    return None


class _Logger:
    """Appends metric rows to metrics.csv and metrics.jsonl; on resume drops rows past the checkpoint."""

    def __init__(self, out: Path, resume_step: Optional[int]):
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"
        if resume_step is None:
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)
            self.jsonl_path.write_text("")
        else:
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        rows = []
        if self.jsonl_path.exists():
            rows = [json.loads(l) for l in self.jsonl_path.read_text().splitlines() if l.strip()]
        rows = [r for r in rows if r["step"] <= step]
        self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writerow(row)


def train(method, sampler: EpisodeSampler, config: TrainConfig, out: str | Path,
          val_sampler: Optional[EpisodeSampler] = None, resume: bool = False, meta: Optional[dict] = None,
          progress: bool = True, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train ``method`` on episodes from ``sampler``; write checkpoints and metrics under ``out``.

    Args:
        meta: extra entries stored in every checkpoint (method name/config, preprocessing, split), so a
            run directory is self-describing.
        resume: continue from ``out/checkpoints/last.pt`` exactly where it stopped.
        on_step: called with the step number after every optimiser step (hooks, tests).
    """
    config.check()
    out = Path(out)
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    device = sampler.device
    method.to(device)
    set_channels_last(method, config.channels_last)
    opt = make_optimizer(method, config)
    sched = make_scheduler(opt, config)
    step, best, elapsed = 0, -math.inf, 0.0

    if resume:
        last = ckdir / "last.pt"
        if not last.is_file():
            raise FewshotError(f"nothing to resume: {last} does not exist")
        ck = checkpoint.load(last, map_location=device)
        if ck.get("method") != method.name:
            raise FewshotError(f"{last} holds a {ck.get('method')!r} run, not {method.name!r}")
        method.load_state_dict(ck["model"])
        set_channels_last(method, config.channels_last)
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        torch.set_rng_state(ck["torch_rng"])
        step, best, elapsed = int(ck["step"]), float(ck["best_val"]), float(ck["train_time_s"])
    else:
        torch.manual_seed(config.seed)
    logger = _Logger(out, step if resume else None)

    def state(kind: str) -> dict:
        return {**(meta or {}), "method": method.name, "method_config": method.config_dict(),
                "in_shape": list(method.in_shape), "model": method.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "sampler": sampler.state_dict(),
                "torch_rng": torch.get_rng_state(), "step": step, "best_val": best, "train_time_s": elapsed,
                "kind": kind, "train_config": asdict(config)}

    def validate(lr: float) -> float:
        """Score the held-out classes, log the row, keep the best checkpoint; returns the validation loss."""
        nonlocal best
        res = evaluate(method, val_sampler, config.val_episodes, precision=config.precision, progress=False)
        logger.write({"step": step, "kind": "val", "val_acc": round(res.mean, 4), "val_ci": round(res.ci95, 4),
                      "val_loss": round(res.loss, 6), "lr": lr, "elapsed_s": round(elapsed, 3)})
        bar.write(f"step {step}: val {res.short()} (loss {res.loss:.4f})")
        if res.score > best:
            best = res.score
            checkpoint.save(state("best"), ckdir / "best.pt")
        return res.loss

    stopped_early = False
    method.train()
    bar = tqdm(total=config.episodes, initial=step, desc=f"train {method.name}", disable=not progress,
               unit="ep", dynamic_ncols=True)
    t_last = time.perf_counter()
    try:
        while step < config.episodes:
            ep = sampler.sample()
            with autocast(device, config.precision):
                loss, metrics = method.loss(ep)
            loss_value = float(loss.detach())       # one host sync per step, reused below
            if not math.isfinite(loss_value):        # before backward: a diverged step changes nothing
                raise FewshotError(f"training diverged at step {step + 1} (loss {loss_value:.3g}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_value > 0:
                torch.nn.utils.clip_grad_value_(method.parameters(), config.grad_clip_value)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), config.grad_clip)
            opt.step()
            if isinstance(sched, (torch.optim.lr_scheduler.StepLR, torch.optim.lr_scheduler.LambdaLR)):
                sched.step()
            step += 1
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            lr = opt.param_groups[0]["lr"]
            if step % config.log_every == 0 or step == config.episodes:
                logger.write({**{k: round(float(v), 6) for k, v in metrics.items()},
                              "step": step, "kind": "train", "loss": round(loss_value, 6), "lr": lr,
                              "elapsed_s": round(elapsed, 3)})
                score = {"mse": f"{metrics['mse']:.3f}"} if "mse" in metrics else \
                    {"bits": f"{metrics['bits']:.2f}"} if "bits" in metrics else \
                    {"acc": f"{metrics.get('acc', 0):.3f}"}
                bar.set_postfix(loss=f"{loss_value:.3f}", **score, lr=f"{lr:.2g}")
            bar.update(1)
            if val_sampler is not None and config.val_every and \
                    (step % config.val_every == 0 or step == config.episodes):
                vloss = validate(lr)
                t_last = time.perf_counter()        # validation time is not training time
                if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    # older torch names the comparison ``is_better``, newer ``_is_better``
                    is_better = getattr(sched, "is_better", None) or sched._is_better
                    attempted = (not is_better(vloss, sched.best)) and sched.num_bad_epochs + 1 > \
                        sched.patience and sched.cooldown_counter == 0
                    at_floor = lr <= config.min_lr * (1 + 1e-6)
                    sched.step(vloss)
                    if config.stop_at_min_lr and attempted and at_floor:
                        stopped_early = True
                        bar.write(f"step {step}: learning rate at its floor {lr:.2g} and no longer changing; "
                                  "stopping")
                        break
            if step % config.ckpt_every == 0:
                checkpoint.save(state("last"), ckdir / "last.pt")
            if on_step is not None:
                on_step(step)
            if config.time_limit_s and elapsed >= config.time_limit_s and step < config.episodes:
                stopped_early = True
                bar.write(f"step {step}: training time limit of {config.time_limit_s:.0f} s reached; stopping")
                if val_sampler is not None and config.val_every and step % config.val_every:
                    validate(lr)
                break
    except KeyboardInterrupt:
        checkpoint.save(state("last"), ckdir / "last.pt")
        bar.close()
        raise
    bar.close()
    checkpoint.save(state("last"), ckdir / "last.pt")
    if val_sampler is None or not config.val_every or not (ckdir / "best.pt").exists():
        checkpoint.save(state("best"), ckdir / "best.pt")
    return TrainResult(step, best, elapsed, stopped_early, str(out))
