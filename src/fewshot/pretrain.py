"""The pretraining stage: supervised training of a method's backbone before episodic meta-training.

With ``pretrain_epochs`` > 0 (``--pretrain-epochs N``), :func:`fewshot.fit` first trains the network the
method's :meth:`~fewshot.methods.base.Method.make_backbone` built (:attr:`Method.backbone_attr`) as an
ordinary classifier over *all* training classes: a linear layer on its features, cross-entropy, shuffled
mini-batches of ``pretrain_batch`` training images (the run's ``augment`` applies), Adam at ``pretrain_lr``
cosine-annealed to 0 over the ``N`` epochs (an epoch is every training image once, the last incomplete
batch left out; the shuffle differs per epoch). Which features: an encoder's output (the metric methods'
embedding); for a whole network with a classifier head (the gradient-based family, see
:attr:`Method.backbone_head`) the head's input, and the network's own head is left as it was built. The
linear classifier exists only for this stage: meta-training starts from the pretrained backbone.

The stage lives in the run directory like the rest: ``checkpoints/pretrain.pt`` (written atomically
through :mod:`fewshot.checkpoint`, recorded in the run's manifest) holds the method, the classifier, the
optimiser, the schedule, the step, the augmentation generator and torch's RNG; it is written at the end of
every epoch and when the stage ends. One metrics row of kind ``pretrain`` per epoch (``loss``, ``acc``,
``epoch``, ``lr``) goes into ``metrics.csv``/``metrics.jsonl`` next to the episodic rows. ``--resume``
during the stage continues it exactly; after it (the episodic stage has a checkpoint, which holds the
pretrained weights) the stage is skipped. Ctrl-C behaves as in :mod:`fewshot.train`: the first stops at
the next step boundary and saves ``pretrain.pt`` with that step's state (:class:`TrainingInterrupted`), a
second stops at once without saving. The stage's time does not count against ``train.time_limit_s``.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .augment import build_transform
from .data.images import to_float
from .errors import FewshotError
from .models import set_channels_last
from .precision import autocast, grad_scaler
from .train import TrainConfig, TrainingInterrupted, _Logger, _StopRequest, make_optimizer

#: the stage's checkpoint, in the run's ``checkpoints/`` folder
CHECKPOINT = "pretrain.pt"
#: the metrics rows of this stage
KIND = "pretrain"


def check(method, cfg) -> None:
    """Refuse ``pretrain_epochs`` where the stage cannot run (one line naming the flag): a method without a
    backbone network, task families (no classes) and label-free tasks (the stage uses the labels). Called
    before the run folder is touched."""
    from . import tasks, unsupervised
    n = cfg.pretrain_epochs
    if not n:
        return
    if tasks.is_family(cfg.data):
        raise FewshotError(f"--pretrain-epochs {n}: pretraining classifies the training images of image "
                           f"classes; --data {cfg.data} is a task family")
    if unsupervised.label_free(cfg):
        raise FewshotError(f"--pretrain-epochs {n}: pretraining uses the training labels, which --tasks "
                           f"{cfg.tasks} never uses")
    if method.backbone_attr is None:
        raise FewshotError(f"--pretrain-epochs {n}: method {method.name} has no backbone network to pretrain "
                           "(it builds its own networks); leave --pretrain-epochs at 0")


def features(net: nn.Module, head: Optional[str], x: torch.Tensor) -> torch.Tensor:
    """``[M, D]`` features of images ``x`` ``[M, ...]``: the output of an encoder (``head`` None), else the
    input of ``net``'s submodule ``head`` (its classifier head) during a forward pass of ``net``."""
    if head is None:
        return net(x).flatten(1)
    seen: dict = {}
    handle = net.get_submodule(head).register_forward_hook(lambda m, inp, out: seen.setdefault("z", inp[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return seen["z"].flatten(1)


def _feature_dim(net: nn.Module, head: Optional[str], in_shape, device) -> int:
    """The length of :func:`features` for one input, measured in eval mode (training flags restored)."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            z = features(net, head, torch.zeros(2, *in_shape, device=device))
    finally:
        for m, t in flags:
            m.training = t
    return int(z.shape[1])


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def run_stage(method, train_ds, cfg, out: str | Path, device, resume: bool = False, progress: bool = True,
              on_step: Optional[Callable[[int], None]] = None) -> bool:
    """Pretrain ``method``'s backbone on ``train_ds`` (a :class:`~fewshot.data.dataset.ClassDataset`) as
    ``cfg`` (a :class:`~fewshot.config.RunConfig`) says, in the run folder ``out`` (see the module
    docstring); a no-op when ``cfg.pretrain_epochs`` is 0. The method is left on ``device`` holding the
    pretrained weights.

    ``on_step`` is called with the stage's step number after every optimiser step (a
    :class:`KeyboardInterrupt` from it stops like a first Ctrl-C).

    Returns whether the episodic stage resumes from its own checkpoint: ``resume`` and
    ``checkpoints/last.pt`` exists (then this stage is over and skipped).

    Raises:
        TrainingInterrupted: on Ctrl-C, naming ``checkpoints/pretrain.pt``.
    """
    out = Path(out)
    ckdir = out / "checkpoints"
    episodic = resume and (ckdir / "last.pt").is_file()
    if not cfg.pretrain_epochs or episodic:
        return episodic
    check(method, cfg)
    path = ckdir / CHECKPOINT
    tc = cfg.train
    net = method.get_submodule(method.backbone_attr)
    head = method.backbone_head
    method.to(device)
    set_channels_last(method, tc.channels_last)
    n_images, n_classes = train_ds.num_images, len(train_ds)
    batch = min(int(cfg.pretrain_batch), n_images)
    per_epoch = n_images // batch
    total = int(cfg.pretrain_epochs) * per_epoch
    classifier = nn.Linear(_feature_dim(net, head, method.in_shape, device), n_classes).to(device)
    params = nn.ModuleList([net, classifier])
    opt = make_optimizer(params, TrainConfig(optimizer="adam", lr=cfg.pretrain_lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total))
    scaler = grad_scaler(device, tc.precision)         # fp16 only: dynamic loss scaling
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    step, elapsed, sums = 0, 0.0, [0.0, 0.0]      # sums: loss and accuracy over the epoch's steps so far
    if resume and path.is_file():
        ck = checkpoint.load(path, map_location=device)
        if ck.get("method") != method.name:
            raise FewshotError(f"{path} holds a {ck.get('method')!r} pretraining, not {method.name!r}")
        if ck.get("images") != n_images or ck.get("classes") != n_classes:
            raise FewshotError(f"--resume: {path} pretrained on {ck.get('classes')} classes of {ck.get('images')} "
                               f"images, the training split now has {n_classes} of {n_images}")
        method.load_state_dict(ck["model"])
        set_channels_last(method, tc.channels_last)
        if ck.get("done"):
            print(f"fewshot: pretraining done ({ck['epoch']} epochs); meta-training", file=sys.stderr)
            return False
        classifier.load_state_dict(ck["classifier"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("grad_scaler") is not None:
            scaler.load_state_dict(ck["grad_scaler"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed, sums = int(ck["step"]), float(ck["train_time_s"]), list(ck["sums"])
    # under torchrun every rank runs the same stage on the same batches (it is not split across ranks) and
    # rank 0 alone writes; meta-training then starts from rank 0's weights
    main = distributed.is_main()
    logger = _Logger(out, step if resume and path.is_file() else None, kinds=(KIND,)) if main else None
    transform = build_transform(cfg.augment)
    labels = train_ds.labels()
    saved_step: Optional[int] = step if resume and path.is_file() else None

    def save(done: bool) -> None:
        nonlocal saved_step
        if not main:
            saved_step = step
            return
        checkpoint.save({"kind": KIND, "method": method.name, "model": method.state_dict(),
                         "classifier": classifier.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "generator": gen.get_state(),
                         "grad_scaler": scaler.state_dict() if scaler is not None else None,
                         "torch_rng": torch.get_rng_state(), "step": step, "epoch": step // per_epoch,
                         "sums": list(sums), "train_time_s": elapsed, "done": done, "images": n_images,
                         "classes": n_classes, "device": str(device),
                         "settings": {"epochs": cfg.pretrain_epochs, "lr": cfg.pretrain_lr, "batch": batch}}, path)
        saved_step = step

    def batch_at(s: int):
        """Images and labels of step ``s``: the shuffle of its epoch (seeded by the run seed and the epoch)."""
        epoch, i = divmod(s, per_epoch)
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        idx = order[i * batch:(i + 1) * batch]
        x = to_float(train_ds.take(idx).to(device))
        if transform is not None:
            x = transform(x.unsqueeze(0), gen).squeeze(0)
        return x, labels[idx].to(device)

    method.train()
    bar = tqdm(total=total, initial=step, desc=f"pretrain {method.name}", disable=not (progress and main),
               unit="batch", dynamic_ncols=True)
    interrupted = False
    t_last = time.perf_counter()
    with _StopRequest() as stop:
        try:
            while step < total:
                x, y = batch_at(step)
                with autocast(device, tc.precision):
                    logits = classifier(features(net, head, x)).float()
                loss = F.cross_entropy(logits, y)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FewshotError(f"pretraining diverged at step {step + 1} (loss {loss_value:.3g}); "
                                       "lower --pretrain-lr")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)          # skipped when the scaled gradient overflowed
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                with warnings.catch_warnings():     # a step the gradient scaler skipped still counts
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    sched.step()
                step += 1
                sums[0] += loss_value
                sums[1] += float((logits.detach().argmax(-1) == y).float().mean())
                now = time.perf_counter()
                elapsed += now - t_last
                t_last = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if step % per_epoch == 0:
                    epoch = step // per_epoch
                    loss_mean, acc_mean = sums[0] / per_epoch, sums[1] / per_epoch
                    if main:
                        logger.write({"step": step, "kind": KIND, "epoch": epoch, "loss": round(loss_mean, 6),
                                      "acc": round(acc_mean, 6), "lr": opt.param_groups[0]["lr"],
                                      "elapsed_s": round(elapsed, 3)})
                        bar.write(f"pretrain epoch {epoch}/{cfg.pretrain_epochs}: loss {loss_mean:.4f}, "
                                  f"training accuracy {100 * acc_mean:.2f}% ({n_classes} classes)")
                    sums = [0.0, 0.0]
                    save(done=step == total)
                    t_last = time.perf_counter()
                if on_step is not None:
                    try:
                        on_step(step)
                    except KeyboardInterrupt:       # between steps: the state is complete
                        stop.requested = True
                if stop.requested and step < total:
                    interrupted = True
                    if saved_step != step:
                        save(done=False)
                    break
        except KeyboardInterrupt:
            bar.close()
            raise TrainingInterrupted(path, saved_step, saved=False) from None
        finally:
            bar.close()
        # a Ctrl-C during the stage's last step: the stage is complete and saved, the run stops before
        # meta-training (a resume goes on with it)
        interrupted = interrupted or stop.requested
    if interrupted:
        raise TrainingInterrupted(path, step, saved=True)
    return False
