"""The one training loop, used by every method.

Adam, a step-decay or reduce-on-plateau schedule (optionally stopping once the learning rate has
reached its floor and stops changing), validation on held-out classes every ``val_every`` steps,
best/last checkpoints written atomically, exact resume (model, optimiser, scheduler, RNG and sampler
state), a tqdm progress bar, and metrics in ``metrics.csv`` / ``metrics.jsonl`` of the run directory.

Stops are exact. A first Ctrl-C (SIGINT) only asks for a stop: the current step (sampling, forward,
backward, optimiser step, its validation and checkpoint) runs to its end, ``last.pt`` is saved with the
state of that completed step and :class:`TrainingInterrupted` is raised, so ``--resume`` continues with the
very episode an uninterrupted run would have drawn next (when that step ended the training, by its
length, time limit or learning-rate floor, the run is simply complete). A second Ctrl-C stops at once and saves nothing
(the state may be half-updated): ``last.pt`` keeps the last periodic checkpoint, which resumes exactly too,
like a SIGKILL. A training loss that grows far beyond its starting level gets one warning line.

Under torchrun every rank runs this same loop on its share of each step's tasks; :mod:`fewshot.distributed`
averages the gradients and buffers, agrees on stops, and leaves the files to rank 0 (its docstring says
exactly what equals one process's run).
"""
from __future__ import annotations

import csv
import json
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoint, distributed, rundir
from .episodes import EpisodeSampler
from .errors import FewshotError
from .evaluate import evaluate
from .explicit import tracks_explicit
from .models import set_channels_last
from .parallel import tune_allocator
from .precision import autocast, grad_scaler

SCHEDULES = ("step", "plateau", "linear", "none")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
CSV_FIELDS = ["step", "kind", "loss", "acc", "lr", "val_acc", "val_ci", "val_loss", "elapsed_s"]
#: warn (once) when the training loss exceeds this multiple of its first-step level, counted as at least
#: EXPLOSION_FLOOR: a first step that happens to score near 0 must not make an ordinary later loss (a 5-way
#: cross-entropy of 1.6) look like an explosion
EXPLOSION_FACTOR, EXPLOSION_FLOOR = 100.0, 1.0


@tracks_explicit
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
    precision: str = "fp32"         #: fp32 | bf16 | fp16 (with dynamic loss scaling; resolved from "auto" by the caller)
    channels_last: bool = False
    seed: int = 0                   #: seeds torch's global RNG (dropout, init) at the start of a run
    time_limit_s: float = 0.0       #: stop once this much training time has passed (0: no limit)
    #: tasks per forward pass (0: all the tasks a process holds); batch norm then normalises over one group,
    #: so groups that divide each rank's share train alike on any number of ranks (see fewshot.distributed)
    task_group: int = 0
    #: torch.compile the method's training loss: off, on (the inductor backend) or a torch.compile backend
    #: name; only for methods whose step has no differentiation inside it (``Method.compilable``)
    compile: str = "off"

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


def make_optimizer(method, cfg: TrainConfig, custom: Optional[Callable] = None):
    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        raise FewshotError(f"{type(method).__name__} has nothing to train: every parameter is frozen "
                           f"(--freeze all on an encoder leaves nothing; freeze a stage instead)")
    own = custom(params) if custom is not None else None
    if own is not None:         # a method that computes its own step (Method.outer_optimizer)
        return own
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
    """Appends metric rows to metrics.csv and metrics.jsonl; on resume drops rows past the checkpoint.

    ``kinds``: the row kinds this stage of a run writes (the episodic trainer's ``train``/``val``); rows of
    other kinds (an earlier stage's, e.g. :mod:`fewshot.pretrain`'s) are kept as they are. ``None``: every
    row is this stage's, and a fresh start begins new files."""

    def __init__(self, out: Path, resume_step: Optional[int], kinds: Optional[tuple] = None):
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"
        self.kinds = kinds
        if kinds is not None:
            self._truncate(-1 if resume_step is None else resume_step)
        elif resume_step is None:
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)
            self.jsonl_path.write_text("")
            rundir.record(self.csv_path)
            rundir.record(self.jsonl_path)
        else:
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        """Keep the rows up to ``step``; a line that is not a complete row (the process was killed during an
        append) is dropped. Both files are rewritten atomically, the CSV from the JSON lines."""
        rows = []
        if self.jsonl_path.exists():
            for line in self.jsonl_path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    continue
                if row["step"] <= step or (self.kinds is not None and row.get("kind") not in self.kinds):
                    rows.append(row)
        rundir.write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        rundir.atomic_write(self.csv_path, write_csv)

    def write(self, row: dict) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writerow(row)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training. ``saved``: ``path`` holds the state after the last completed step ``step``
    and ``--resume`` continues exactly. Otherwise (a second Ctrl-C) training stopped at once without saving;
    ``path`` holds the last periodic checkpoint, of step ``step`` (``None``: none was written yet)."""

    def __init__(self, path: Path, step: Optional[int], saved: bool):
        super().__init__(path, step, saved)
        self.path, self.step, self.saved = path, step, saved

    def __str__(self) -> str:
        if self.saved:
            return f"interrupted (training state saved to {self.path} at step {self.step}; continue with --resume)"
        if self.step is None:
            return f"interrupted at once (no checkpoint was written yet, {self.path} does not exist; train again)"
        return (f"interrupted at once (nothing saved; {self.path} holds step {self.step} from the last periodic "
                "checkpoint; continue with --resume)")


class _StopRequest:
    """While active (a context manager, in the main thread, where SIGINT has Python's default handler):
    the first SIGINT sets :attr:`requested`, which the training loop checks between steps; a second one
    raises :class:`KeyboardInterrupt` at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:
            print("\nfewshot: stopping after the current step (Ctrl-C again to stop at once, unsaved)",
                  file=sys.stderr, flush=True)
        except (RuntimeError, OSError, ValueError):   # stderr busy (re-entered) or closed: the stop still happens
            pass

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def compiled_loss(method, how: str):
    """``method.loss``, through ``torch.compile`` unless ``how`` is "off" (see :attr:`TrainConfig.compile`)."""
    if how in ("off", "", None):
        return method.loss
    if not getattr(method, "compilable", False):
        raise FewshotError(f"--compile {how}: the {method.name} training step cannot be compiled (it "
                           "differentiates inside the step or has data-dependent control flow); leave --compile off")
    if how != "on" and how not in torch._dynamo.list_backends(exclude_tags=()):
        raise FewshotError(f"--compile {how}: unknown torch.compile backend; choose off, on or one of "
                           f"{', '.join(torch._dynamo.list_backends())}")
    return torch.compile(method.loss, backend="inductor" if how == "on" else how)


def _step_gradients(method, episode, config: TrainConfig, device, scaler=None, loss_fn=None) -> tuple:
    """Loss (a float) and metrics of one step, with its gradient accumulated in ``.grad``: on this rank's
    share of ``episode`` (all of it in one process), in forward passes of ``config.task_group`` tasks each
    (their mean loss). Each group starts from the step's starting buffers (running statistics); floating
    buffers end as the start plus the groups' mean change, counters (``num_batches_tracked``) as after one
    group, as after one forward pass of the whole share; then :func:`fewshot.distributed.reduce_step`
    averages gradients, buffers and numbers over the ranks. Returns ``(loss, metrics)``, averaged."""
    distributed.check_batch(episode.batch, config.task_group)
    part = episode.tasks(distributed.share(episode.batch)) if distributed.active() else episode
    size = config.task_group or part.batch
    groups = [part.tasks(slice(i, i + size)) for i in range(0, part.batch, size)] if size < part.batch else [part]
    bufs = [b for b in method.buffers() if b.is_floating_point()]
    start = [b.detach().clone() for b in bufs] if len(groups) > 1 or distributed.active() else None
    change = [torch.zeros_like(b) for b in bufs] if len(groups) > 1 else None
    counters = [(b, b.detach().clone()) for b in method.buffers() if not b.is_floating_point()] \
        if len(groups) > 1 else []
    total, sums = 0.0, {}
    for g in groups:
        if change is not None:
            with torch.no_grad():
                for b, s in list(zip(bufs, start)) + counters:
                    b.copy_(s)
        with autocast(device, config.precision):
            loss, metrics = (loss_fn or method.loss)(g)
        scaled = scaler.scale(loss) if scaler is not None else loss     # fp16: the loss-scaled gradient
        (scaled / len(groups) if len(groups) > 1 else scaled).backward()
        total += float(loss.detach())        # one host sync per group, reused below
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if change is not None:
            with torch.no_grad():
                for c, b, s in zip(change, bufs, start):
                    c += b - s
    if change is not None:
        with torch.no_grad():
            for b, s, c in zip(bufs, start, change):
                b.copy_(s + c / len(groups))
    names = list(sums)
    values = distributed.reduce_step([p for p in method.parameters() if p.requires_grad],
                                     list(zip(bufs, start)) if distributed.active() else [],
                                     [total / len(groups)] + [sums[k] / len(groups) for k in names])
    return values[0], dict(zip(names, values[1:]))


def train(method, sampler: EpisodeSampler, config: TrainConfig, out: str | Path,
          val_sampler: Optional[EpisodeSampler] = None, resume: bool = False, meta: Optional[dict] = None,
          progress: bool = True, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train ``method`` on episodes from ``sampler``; write checkpoints and metrics under ``out``.

    Args:
        meta: extra entries stored in every checkpoint (method name/config, preprocessing, split), so a
            run directory is self-describing.
        resume: continue from ``out/checkpoints/last.pt`` exactly where it stopped; a ``config`` that differs
            from the checkpoint's in anything but a longer run (more episodes, a longer time limit) is refused.
        on_step: called with the step number after every optimiser step (hooks, tests); a
            :class:`KeyboardInterrupt` raised by it stops training like a first Ctrl-C.

    Raises:
        TrainingInterrupted: on Ctrl-C (see the module docstring).
    """
    config.check()
    out = Path(out)
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    device = sampler.device
    if device.type == "cpu":
        tune_allocator()        # large temporaries reused, not page-faulted in again every step
    method.to(device)
    set_channels_last(method, config.channels_last)
    opt = make_optimizer(method, config, method.outer_optimizer)
    sched = make_scheduler(opt, config)
    scaler = grad_scaler(device, config.precision)     # fp16 only: dynamic loss scaling (None otherwise)
    loss_fn = compiled_loss(method, config.compile)
    step, best, elapsed = 0, -math.inf, 0.0
    loss_start: Optional[float] = None        # |loss| of the run's first step: the level explosions are judged by
    last_path = ckdir / "last.pt"

    if resume:
        if not last_path.is_file():
            raise FewshotError(f"nothing to resume: {last_path} does not exist")
        ck = checkpoint.load(last_path, map_location=device)
        if ck.get("method") != method.name:
            raise FewshotError(f"{last_path} holds a {ck.get('method')!r} run, not {method.name!r}")
        saved_cfg = ck.get("train_config") if isinstance(ck.get("train_config"), dict) else {}
        known = {f.name for f in fields(TrainConfig)}       # settings added since the checkpoint: defaults
        old_cfg = asdict(TrainConfig(**{k: v for k, v in saved_cfg.items() if k in known}))
        diffs = rundir.changed_settings({"train": old_cfg}, {"train": asdict(config)}) if saved_cfg else []
        if diffs:
            raise FewshotError(f"resume would change the training settings of {last_path}: {', '.join(diffs)}")
        if ck.get("device") is not None and torch.device(ck["device"]).type != device.type:
            raise FewshotError(f"{last_path} was trained on {ck['device']}; resuming it on {device} would not "
                               f"continue it exactly: resume on a {torch.device(ck['device']).type} device")
        method.load_state_dict(ck["model"])
        set_channels_last(method, config.channels_last)
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("grad_scaler") is not None:
            scaler.load_state_dict(ck["grad_scaler"])
        sampler.load_state_dict(ck["sampler"])
        torch.set_rng_state(ck["torch_rng"])
        step, best, elapsed = int(ck["step"]), float(ck["best_val"]), float(ck["train_time_s"])
        loss_start = ck.get("loss_start")
    else:
        torch.manual_seed(config.seed)
    distributed.broadcast_module(method)        # every rank starts from rank 0's weights (no-op alone)
    main = distributed.is_main()                # rank 0 alone writes metrics and checkpoints
    logger = _Logger(out, step if resume else None, kinds=("train", "val")) if main else None
    saved_step: Optional[int] = step if resume else None       # the step that last.pt on disk holds

    def state(kind: str) -> dict:
        return {**(meta or {}), "method": method.name, "method_config": method.config_dict(),
                "in_shape": list(method.in_shape), "model": method.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "sampler": sampler.state_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(), "step": step, "best_val": best, "train_time_s": elapsed,
                "kind": kind, "train_config": asdict(config), "device": str(device), "loss_start": loss_start}

    def save_last() -> None:
        nonlocal saved_step
        if main:
            checkpoint.save(state("last"), last_path)
        saved_step = step

    def note(message: str) -> None:
        """A line under the progress bar (rank 0's only)."""
        if main:
            bar.write(message)

    def log(row: dict) -> None:
        if main:
            logger.write(row)

    def validate(lr: float) -> float:
        """Score the held-out classes, log the row, keep the best checkpoint; returns the validation loss."""
        nonlocal best
        res = evaluate(method, val_sampler, config.val_episodes, precision=config.precision, progress=False)
        log({"step": step, "kind": "val", "val_acc": round(res.mean, 4), "val_ci": round(res.ci95, 4),
             "val_loss": round(res.loss, 6), "lr": lr, "elapsed_s": round(elapsed, 3)})
        note(f"step {step}: val {res.short()} (loss {res.loss:.4f})")
        if res.score > best:
            best = res.score
            if main:
                checkpoint.save(state("best"), ckdir / "best.pt")
        return res.loss

    stopped_early, warned, interrupted = False, False, False
    method.train()
    bar = tqdm(total=config.episodes, initial=step, desc=f"train {method.name}",
               disable=not (progress and main), unit="ep", dynamic_ncols=True)
    t_last = time.perf_counter()
    with _StopRequest() as stop:
        try:
            while step < config.episodes:
                ep = sampler.sample()
                opt.zero_grad(set_to_none=True)
                # this rank's share of the tasks, gradients and numbers averaged over the ranks
                loss_value, metrics = _step_gradients(method, ep, config, device, scaler, loss_fn)
                if not math.isfinite(loss_value):        # before the optimiser step: a diverged step changes nothing
                    raise FewshotError(f"training diverged at step {step + 1} (loss {loss_value:.3g}); lower --lr")
                if loss_start is None:
                    loss_start = abs(loss_value)
                elif not warned and abs(loss_value) > EXPLOSION_FACTOR * max(loss_start, EXPLOSION_FLOOR):
                    warned = True
                    note(f"warning: step {step + 1}: training loss {loss_value:.3g} is over "
                         f"{EXPLOSION_FACTOR:g}x its starting level {max(loss_start, EXPLOSION_FLOOR):.3g}; "
                         f"the learning rate {opt.param_groups[0]['lr']:.3g} is probably too high (try a "
                         "lower --lr)")
                if scaler is not None:
                    scaler.unscale_(opt)         # clipping and the step see the true gradient
                if config.grad_clip_value > 0:
                    torch.nn.utils.clip_grad_value_(method.parameters(), config.grad_clip_value)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), config.grad_clip)
                if scaler is not None:
                    scaler.step(opt)             # skipped when the scaled gradient overflowed
                    scaler.update()
                else:
                    opt.step()
                if isinstance(sched, (torch.optim.lr_scheduler.StepLR, torch.optim.lr_scheduler.LambdaLR)):
                    with warnings.catch_warnings():     # a step the gradient scaler skipped still counts
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        sched.step()
                step += 1
                now = time.perf_counter()
                elapsed += now - t_last
                t_last = now
                lr = opt.param_groups[0]["lr"]
                if step % config.log_every == 0 or step == config.episodes:
                    log({**{k: round(float(v), 6) for k, v in metrics.items()},
                         "step": step, "kind": "train", "loss": round(loss_value, 6), "lr": lr,
                         "elapsed_s": round(elapsed, 3)})
                    # the method's own metrics, whatever it names them (acc, mse, bits, return, ...)
                    score = {k: f"{float(v):.3g}" for k, v in list(metrics.items())[:3] if k not in ("loss", "lr")}
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
                            note(f"step {step}: learning rate at its floor {lr:.2g} and no longer changing; "
                                 "stopping")
                            break
                if step % config.ckpt_every == 0:
                    save_last()
                if on_step is not None:
                    try:
                        on_step(step)
                    except KeyboardInterrupt:       # raised between steps: the state is complete
                        stop.requested = True
                # every rank stops after the same step: when any was asked to stop or ran out of time
                time_up, stop_now = distributed.any_rank(
                    bool(config.time_limit_s) and elapsed >= config.time_limit_s and step < config.episodes,
                    stop.requested and step < config.episodes)
                if time_up:
                    stopped_early = True
                    note(f"step {step}: training time limit of {config.time_limit_s:.0f} s reached; stopping")
                    if val_sampler is not None and config.val_every and step % config.val_every:
                        validate(lr)
                    break
                if stop_now:        # a step boundary: all of this step is done
                    stop.requested = interrupted = True
                    break
            save_last()
            if main and (val_sampler is None or not config.val_every or not (ckdir / "best.pt").exists()):
                checkpoint.save(state("best"), ckdir / "best.pt")
        except KeyboardInterrupt:
            # a second Ctrl-C (or an interrupt not sent through our handler) inside a step: the model or the
            # optimiser may be half-updated, so nothing is saved; last.pt keeps its complete earlier state
            bar.close()
            raise TrainingInterrupted(last_path, saved_step, saved=False) from None
        finally:
            bar.close()
        if interrupted:
            raise TrainingInterrupted(last_path, step, saved=True)
        if stop.requested:      # the step that Ctrl-C let finish ended the training: the run is complete
            note(f"step {step}: training ended with the step that Ctrl-C let finish")
    return TrainResult(step, best, elapsed, stopped_early, str(out))
