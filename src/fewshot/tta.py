"""Test-time augmentation (TTA): predict from jittered copies of every support and query image.

With ``copies = M`` each support image is joined by M randomly transformed copies carrying its label (so a
prototypical network's prototype becomes the mean embedding of the image and its copies), and each query
is scored M + 1 times (as given and as M copies); the prediction is the mean of the M + 1 log-softmax
vectors. For a prototypical network with squared-Euclidean distance this mean ranks the classes exactly
as the distance from the mean query embedding does, since ``-||z_i - c||^2`` averaged over copies is
``-||mean z - c||^2`` plus a term that does not depend on the class.

The copies are drawn from a generator seeded at :meth:`TestTimeAugment.reset` (the evaluator resets it
with the test sampler), so an evaluation with TTA is as reproducible as one without. Training is not
affected: TTA only wraps ``predict``. It costs M + 1 times the inference compute; the queries of one call
are processed in chunks of tasks so memory stays bounded.
"""
from __future__ import annotations

import torch
from torch import nn

from .augment import RandomAffine, build_transform
from .errors import FewshotError

#: images per forward call when the copies are scored (bounds the activation memory of a TTA call)
IMAGES_PER_CALL = 1024


def predict_labelled(wrapper: nn.Module, episode, only: str) -> torch.Tensor:
    """``wrapper.predict`` on an episode's support and queries, for the test-time wrappers (augmentation,
    fine-tuning): episodes that carry more (unlabelled examples, class attributes) are refused, with ``only``
    saying what the wrapper uses, rather than scored without it."""
    if episode.extra:
        raise FewshotError(f"{only}; these episodes also carry {', '.join(sorted(episode.extra))}")
    return wrapper.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)


class TestTimeAugment(nn.Module):
    """Wraps a trained method so that ``predict`` averages over ``copies`` jittered copies of the inputs.

    ``augment`` is a transform spec as in the run config (``{"affine": {...}}``); empty means the default
    :class:`~fewshot.augment.RandomAffine` jitter. ``query=False`` augments only the support set.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, method: nn.Module, copies: int, augment: dict | None = None, query: bool = True,
                 seed: int = 0):
        super().__init__()
        if copies < 1:
            raise FewshotError(f"test-time augmentation needs at least 1 copy, got {copies}")
        self.method = method
        self.copies, self.query, self.seed = int(copies), bool(query), int(seed)
        self.transform = build_transform(augment) or RandomAffine()
        self.generator: torch.Generator | None = None
        self.reset()

    @property
    def inference_mode(self) -> str:
        return self.method.inference_mode

    def reset(self) -> None:
        """Restart the copies' random stream from the seed given at construction."""
        self.generator = None

    def _gen(self, device) -> torch.Generator:
        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def _copies(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, C, H, W]`` -> ``[B, M, S, C, H, W]`` jittered copies (float maths, input dtype out)."""
        B, S = x.shape[:2]
        rep = x.unsqueeze(1).expand(B, self.copies, *x.shape[1:]).reshape(B, self.copies * S, *x.shape[2:])
        out = self.transform(rep.float(), self._gen(x.device)).to(x.dtype)
        return out.view(B, self.copies, S, *x.shape[2:])

    def predict_episode(self, episode) -> torch.Tensor:
        return predict_labelled(self, episode, "test-time augmentation scores a labelled support and queries only")

    @torch.no_grad()
    def predict(self, support_x, support_y, query_x, ways=None) -> torch.Tensor:
        if support_x.dim() < 5:
            raise FewshotError("test-time augmentation applies to image tasks [B, S, C, H, W]")
        if torch.is_floating_point(support_y):
            raise FewshotError("test-time augmentation averages class probabilities; it does not apply to "
                               "regression targets")
        B, Q = support_x.shape[0], query_x.shape[1]
        views = self.copies + 1
        sx = torch.cat([support_x.unsqueeze(1), self._copies(support_x)], 1).flatten(1, 2)   # [B, (M+1)S, ...]
        sy = support_y.repeat(1, views)
        qx = (torch.cat([query_x.unsqueeze(1), self._copies(query_x)], 1) if self.query
              else query_x.unsqueeze(1))                                                     # [B, V, Q, ...]
        qv = qx.shape[1]
        per_task = sx.shape[1] + qv * Q
        step = max(1, IMAGES_PER_CALL // per_task)
        outs = []
        for i in range(0, B, step):
            logits = self.method.predict(sx[i:i + step], sy[i:i + step], qx[i:i + step].flatten(1, 2), ways)
            logp = logits.float().log_softmax(-1)
            outs.append(logp.view(logp.shape[0], qv, Q, -1).mean(1))
        return torch.cat(outs)


def with_tta(method: nn.Module, copies: int, augment: dict | None = None, seed: int = 0) -> nn.Module:
    """``method`` itself when ``copies`` is 0, else a :class:`TestTimeAugment` around it."""
    return TestTimeAugment(method, copies, augment, seed=seed) if copies else method
