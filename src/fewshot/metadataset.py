"""Variable-way, variable-shot episodes: the sampling protocol of Meta-Dataset (Triantafillou et al., "Meta-Dataset:
A dataset of datasets for learning to learn from few examples", ICLR 2020, section 3.2), for evaluating one
model across data sets of very different sizes.

Each episode is drawn in four steps (defaults are the paper's):

1. **ways**: ``N`` uniform in ``[min_ways, min(max_ways, classes)]`` (5 and 50), then ``N`` distinct classes
   uniformly (the paper's class hierarchies for ImageNet and Omniglot are not used).
2. **queries**: the same number per class, ``q = min(max_query, min_c floor(n_c / 2))`` over the chosen
   classes' image counts ``n_c`` (``max_query`` 10), so at most half of any class is query.
3. **support set size**: ``|S| = min(max_support, sum_c ceil(beta * min(max_support_per_class, n_c - q)))``
   with ``beta`` uniform in (0, 1] (500 and 100): at least one image per way.
4. **shots**: class ``c`` gets a share ``R_c`` proportional to ``n_c * exp(alpha_c)``, ``alpha_c`` uniform in
   ``[log 0.5, log 2)`` (class-imbalanced like the data, with noise), and
   ``K_c = min(floor(R_c * (|S| - N)) + 1, n_c - q)`` support images (at least one).

Support and query images of a class are distinct, drawn uniformly from it.

The :class:`Episode` contract: a :class:`MetaDatasetSampler` episode is **a batch of one task** (``B = 1``),
support ordered class by class with labels ``0..N-1`` (``support_y``), ``N * q`` queries class by class;
``ways`` is ``N``, ``queries`` is ``q``, ``shots`` is the fewest support images of any way and
``extra["shots"]`` ``[1, N]`` holds every way's count. Methods that read the support set through its labels
(prototypes, nearest neighbours, fine-tuned heads) take such episodes as they are; a method that reshapes
the support set into ``[N, K]`` cannot. :func:`evaluate_variable` evaluates a method on them.
Memory-mapped data sets (:mod:`fewshot.data.mapped`) are read an episode at a time.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from .data.dataset import ClassDataset
from .data.images import to_float
from .episodes import Episode
from .errors import FewshotError


class MetaDatasetSampler:
    """Draws Meta-Dataset episodes (see the module docstring) from a :class:`ClassDataset`.

    Args:
        dataset: where the classes come from (at least ``min_ways`` classes of at least 2 images each).
        device: where episodes are built.
        seed: seeds the sampler's own generator; the same seed gives the same episodes.
        dtype: float type of the images (scaled to [0, 1]); ``None`` keeps uint8.
        min_ways, max_ways, max_query, max_support, max_support_per_class, log_weight: the protocol's
            constants (5, 50, 10, 500, 100, ``(log 0.5, log 2)``).
        transform: optional callable ``(x, generator)`` applied to the support and query images
            ``[1, M, C, H, W]`` (augmentation).
    """

    def __init__(self, dataset: ClassDataset, device="cpu", seed: int = 0, dtype=torch.float32,
                 min_ways: int = 5, max_ways: int = 50, max_query: int = 10, max_support: int = 500,
                 max_support_per_class: int = 100, log_weight=(math.log(0.5), math.log(2.0)), transform=None):
        for k, v in (("min_ways", min_ways), ("max_query", max_query), ("max_support_per_class",
                                                                          max_support_per_class)):
            if int(v) < 1:
                raise FewshotError(f"{k} must be at least 1, got {v}")
        if max_ways < min_ways:
            raise FewshotError(f"max_ways ({max_ways}) is below min_ways ({min_ways})")
        if max_support < min(max_ways, len(dataset)):
            raise FewshotError(f"max_support ({max_support}) must allow one support image for each of up to "
                               f"{min(max_ways, len(dataset))} ways")
        if len(dataset) < min_ways:
            raise FewshotError(f"Meta-Dataset episodes have at least {min_ways} ways but the data has only "
                               f"{len(dataset)} classes")
        small = (dataset.counts < 2).nonzero().flatten()
        if len(small):
            c = int(small[0])
            raise FewshotError(f"class {dataset.names[c]!r} has {int(dataset.counts[c])} image; Meta-Dataset "
                               "episodes need at least 2 per class (one support, one query)")
        self.dataset, self.device, self.seed, self.dtype, self.transform = dataset, torch.device(device), \
            seed, dtype, transform
        self.min_ways, self.max_ways = int(min_ways), int(min(max_ways, len(dataset)))
        self.max_query, self.max_support = int(max_query), int(max_support)
        self.max_support_per_class = int(max_support_per_class)
        self.log_weight = (float(log_weight[0]), float(log_weight[1]))
        self.image_shape = dataset.image_shape
        self.counts, self.offsets = dataset.counts.clone(), dataset.offsets.clone()
        self.generator = torch.Generator()       # the description is drawn on the CPU, images gathered once
        self.generator.manual_seed(seed)
        self.batch = 1

    # ---------------------------------------------------------------- state for exact resume
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # ---------------------------------------------------------------- sampling
    def describe(self) -> tuple:
        """One episode's composition: (classes ``[N]``, shots per class ``[N]``, queries per class)."""
        g = self.generator
        n_way = int(torch.randint(self.min_ways, self.max_ways + 1, (1,), generator=g))
        classes = torch.randperm(len(self.counts), generator=g)[:n_way]
        n = self.counts[classes]
        q = int(min(self.max_query, int((n // 2).min())))
        remaining = n - q
        beta = float(torch.rand((), generator=g, dtype=torch.float64))   # [0, 1): floor(beta x) + 1 = ceil((1-beta') x)
        contrib = remaining.clamp(max=self.max_support_per_class).double()
        size = int(min(self.max_support, int((torch.floor(beta * contrib) + 1).sum())))
        lo, hi = self.log_weight
        alpha = torch.rand(n_way, generator=g, dtype=torch.float64) * (hi - lo) + lo
        share = n.double() * alpha.exp()
        share = share / share.sum()
        shots = torch.minimum(torch.floor(share * (size - n_way)).long() + 1, remaining)
        return classes, shots, q

    def sample(self, batch: Optional[int] = None) -> Episode:
        """One Meta-Dataset task as an :class:`Episode` with a task axis of 1 (see the module docstring)."""
        if batch not in (None, 1):
            raise FewshotError(f"Meta-Dataset episodes have a different shape each; draw them one at a time "
                               f"(batch 1), not {batch}")
        classes, shots, q = self.describe()
        sup, qry = [], []
        for c, k in zip(classes.tolist(), shots.tolist()):
            perm = torch.randperm(int(self.counts[c]), generator=self.generator) + int(self.offsets[c])
            qry.append(perm[:q])
            sup.append(perm[q:q + k])
        sx, qx = self._gather(torch.cat(sup)), self._gather(torch.cat(qry))
        if self.transform is not None:
            sx = self.transform(sx, self.generator)
            qx = self.transform(qx, self.generator)
        labels = torch.arange(len(classes), device=self.device)
        sy = labels.repeat_interleave(shots.to(self.device)).unsqueeze(0)
        qy = labels.repeat_interleave(q).unsqueeze(0)
        extra = {"shots": shots.to(self.device).unsqueeze(0)}
        if self.dataset.attributes is not None:
            extra["attributes"] = self.dataset.attributes[classes].to(self.device).unsqueeze(0)
        return Episode(sx, sy, qx, qy, len(classes), int(shots.min()), q,
                       classes=classes.to(self.device).unsqueeze(0), extra=extra)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.dataset.take(idx).to(self.device)
        if self.dtype is not None:
            x = to_float(x, self.dtype)
        return x.unsqueeze(0)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def __repr__(self) -> str:
        return (f"MetaDatasetSampler({self.min_ways}-{self.max_ways} ways, <= {self.max_query} queries, support <= "
                f"{self.max_support}, {len(self.dataset)} classes, seed {self.seed}, device {self.device})")


def evaluate_variable(method, sampler: MetaDatasetSampler, episodes: int = 600, precision: str = "fp32"):
    """Accuracy of ``method`` on ``episodes`` Meta-Dataset tasks from ``sampler`` (reset to its seed first):
    an :class:`~fewshot.evaluate.EvalResult` whose ``ways``/``shots``/``queries`` are 0 (they vary) and whose
    mode is ``"meta-dataset"``."""
    from .evaluate import EvalResult
    from .precision import autocast
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise FewshotError(f"episodes must be at least 1, got {episodes!r}")
    was_training = method.training
    method.eval()
    sampler.generator.manual_seed(sampler.seed)
    accs, losses = [], []
    try:
        for _ in range(episodes):
            ep = sampler.sample()
            with autocast(sampler.device, precision):
                if hasattr(method, "predict_episode"):
                    logits = method.predict_episode(ep)
                else:
                    logits = method.predict(ep.support_x, ep.support_y, ep.query_x, ep.ways)
            logits = logits.detach().float()
            accs.append(float((logits.argmax(-1) == ep.query_y).float().mean()) * 100)
            losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ep.query_y.flatten())))
    finally:
        method.train(was_training)
    t = torch.tensor(accs, dtype=torch.float64)
    std = float(t.std()) if len(accs) > 1 else 0.0
    return EvalResult(mean=float(t.mean()), ci95=1.96 * std / math.sqrt(len(accs)), std=std, n=len(accs),
                      ways=0, shots=0, queries=0, seed=sampler.seed, mode="meta-dataset",
                      loss=float(sum(losses) / len(losses)), accuracies=accs)
