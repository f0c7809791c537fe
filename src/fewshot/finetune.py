"""Test-time fine-tuning: adapt a copy of a trained method to each task's support set, then predict.

This is the third stage of P>M>F (Hu et al., CVPR 2022: pretrain, meta-train, fine-tune). For every task a
copy of the method is made from the trained weights and given ``steps`` optimiser steps (Adam, learning rate
``lr``) on *pseudo-episodes built from the support set alone*: the un-augmented support images are the
support (a prototypical network's prototypes), and ``views`` randomly jittered copies of every support
image (:class:`~fewshot.augment.RandomAffine`, or the run's augmentation) are the pseudo-queries, labelled
with their image's class. The loss is the method's own episodic loss (:meth:`Method.loss` on that
pseudo-episode: cross-entropy over distances for a prototypical network, its relation scores for a relation
network, contrastive pairs for a Siamese network, ...). With one shot per class this is the only episode
the support set allows. The adapted copy then predicts the real queries; the copy is thrown away and the
trained method is never changed.

Every parameter the method trains is adapted (a stage frozen with ``freeze`` stays frozen). The copy runs
in evaluation mode while it adapts: batch norm uses the trained running statistics (and does not update
them) and dropout is off, so step 0 is exactly the plain prediction and a query is still classified on its
own (inductive).

Reproducible: each task's augmentations and any randomness of the loss (the Siamese network's pair
draws) come from a seed drawn, task after task, from a generator seeded at :meth:`TestTimeFinetune.reset`
(the evaluator resets it with the test sampler), inside a forked global RNG so nothing outside changes.

Tasks are adapted one after another (a per-task loop), not vectorised with ``torch.func.vmap``: the
methods' losses compute Python-side metrics (``float(...)`` of tensors) and some draw data-dependent
pairs, which vmap cannot trace; a task's S steps cost S forward/backward passes over its support
images and their copies.

Gradient-based methods (MAML and its family, Reptile, Meta-LSTM) already adapt to each support set by
gradient steps in their inner loop; fine-tuning them is refused with a one-line error (change their own
inner-loop steps instead).

:class:`TestTimeFinetune` composes with test-time augmentation: ``with_tta(with_finetune(method, ...), M)``
fine-tunes on the support set (with its TTA copies) and averages the adapted copy's predictions.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from .augment import RandomAffine, build_transform
from .episodes import Episode
from .errors import FewshotError
from .methods.base import infer_ways
from .tta import TestTimeAugment, predict_labelled

#: jittered copies of every support image used as pseudo-queries in each fine-tuning step
VIEWS = 2


def check_finetune(steps, lr) -> None:
    """One-line errors for fine-tuning settings: ``steps`` an integer >= 0, ``lr`` a finite number that is
    more than 0 whenever ``steps`` > 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise FewshotError(f"--finetune-steps takes a number of steps >= 0, got {steps!r}")
    if steps and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise FewshotError(f"--finetune-lr must be a finite number more than 0 when fine-tuning "
                           f"(--finetune-steps {steps}), got {lr!r}")


class TestTimeFinetune(nn.Module):
    """Wraps a trained method so that ``predict`` first fine-tunes a copy of it on each task's support set.

    ``steps``: optimiser steps per task (at least 1); ``lr``: Adam's learning rate; ``augment``: a transform
    spec as in the run config (``{"affine": {...}}``), empty for the default :class:`RandomAffine` jitter;
    ``views``: jittered copies of each support image per step (the pseudo-queries); ``seed``: seeds the
    augmentations and the losses' own randomness (see :meth:`reset`).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, method: nn.Module, steps: int, lr: float, augment: dict | None = None, seed: int = 0,
                 views: int = VIEWS):
        super().__init__()
        check_finetune(steps, lr)
        if steps < 1:
            raise FewshotError(f"test-time fine-tuning needs at least 1 step, got {steps}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise FewshotError(f"test-time fine-tuning needs at least 1 view per support image, got {views!r}")
        if getattr(type(method), "adapts_by_gradient", False):
            raise FewshotError(f"--finetune-steps: method {method.name} already adapts to each support set by "
                               "gradient steps (its inner loop); test-time fine-tuning is for metric methods")
        if not any(p.requires_grad for p in method.parameters()):
            raise FewshotError("--finetune-steps: the method has no trainable parameters to fine-tune "
                               "(all frozen)")
        self.method = method
        self.steps, self.lr, self.views, self.seed = int(steps), float(lr), int(views), int(seed)
        self.transform = build_transform(augment) or RandomAffine()
        self.generator: Optional[torch.Generator] = None

    @property
    def inference_mode(self) -> str:
        return self.method.inference_mode

    def reset(self) -> None:
        """Restart the per-task seeds from the seed given at construction."""
        self.generator = None

    def _task_seed(self) -> int:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        return int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        return predict_labelled(self, episode, "test-time fine-tuning adapts on a labelled support set only")

    @torch.no_grad()
    def predict(self, support_x, support_y, query_x, ways=None) -> torch.Tensor:
        """Logits ``[B, M, ways]``: for each task, a copy of the method fine-tuned on that task's support
        set predicts its queries."""
        if support_x.dim() < 5:
            raise FewshotError("test-time fine-tuning applies to image tasks [B, S, C, H, W]")
        if torch.is_floating_point(support_y):
            raise FewshotError("test-time fine-tuning adapts classifiers; it does not apply to regression targets")
        ways = infer_ways(support_y, ways)
        work = copy.deepcopy(self.method)        # the copy that adapts; self.method is never touched
        work.eval()
        trained = self.method.state_dict()
        outs = []
        for b in range(support_x.shape[0]):
            work.load_state_dict(trained)
            sx, sy = support_x[b:b + 1], support_y[b:b + 1]
            self.adapt(work, sx, sy, ways, self._task_seed())
            outs.append(work.predict(sx, sy, query_x[b:b + 1], ways))
        return torch.cat(outs)

    def pseudo_episode(self, support_x, support_y, ways: int, generator: torch.Generator) -> Episode:
        """The pseudo-episode of one task ``[1, S, ...]``: its support images sorted by class as the support,
        :attr:`views` jittered copies of each as the queries (class by class, as the sampler lays out
        episodes). Every class must have the same number of support images."""
        order = torch.sort(support_y[0], stable=True).indices
        sx, sy = support_x[:, order].float(), support_y[:, order]
        counts = torch.bincount(sy[0], minlength=ways)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise FewshotError(f"--finetune-steps: test-time fine-tuning needs the same number of support images "
                               f"in every class, got {', '.join(str(int(c)) for c in counts)}")
        shots, S, shape = int(counts[0]), sx.shape[1], sx.shape[2:]
        rep = sx.expand(self.views, S, *shape).unsqueeze(0)                      # [1, V, S, ...]
        qx = self.transform(rep, generator).view(self.views, ways, shots, *shape)
        qx = qx.transpose(0, 1).reshape(1, ways * self.views * shots, *shape)   # class by class
        qy = torch.arange(ways, device=sy.device).repeat_interleave(self.views * shots).unsqueeze(0)
        return Episode(sx.to(support_x.dtype), sy, qx.to(support_x.dtype), qy, ways, shots, self.views * shots)

    def adapt(self, work: nn.Module, support_x, support_y, ways: int, seed: int) -> None:
        """Fine-tune ``work`` in place: :attr:`steps` Adam steps of its own loss on pseudo-episodes of the
        support set ``[1, S, ...]``, with every random draw seeded by ``seed``."""
        params = [p for p in work.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, foreach=True)   # one fused update per step
        dev = support_x.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.enable_grad():
            torch.manual_seed(seed)
            for _ in range(self.steps):
                loss, _ = work.loss(self.pseudo_episode(support_x, support_y, ways, gen))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def with_finetune(method: nn.Module, steps: int, lr: float, augment: dict | None = None,
                  seed: int = 0) -> nn.Module:
    """``method`` itself when ``steps`` is 0, else a :class:`TestTimeFinetune` around it (settings checked
    either way)."""
    check_finetune(steps, lr)
    return TestTimeFinetune(method, steps, lr, augment, seed=seed) if steps else method


def find_finetune(method: nn.Module) -> Optional[TestTimeFinetune]:
    """The fine-tuning wrapper in a chain of test-time wrappers (test-time augmentation around fine-tuning,
    or fine-tuning alone), or ``None`` when the method is not fine-tuned."""
    while isinstance(method, (TestTimeAugment, TestTimeFinetune)):
        if isinstance(method, TestTimeFinetune):
            return method
        method = method.method
    return None
