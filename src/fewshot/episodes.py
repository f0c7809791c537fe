"""Episode sampler: batches of N-way K-shot tasks built by tensor indexing from a seeded generator.

An :class:`Episode` holds a batch of ``B`` tasks:

- ``support_x`` ``[B, N*K, C, H, W]`` and ``support_y`` ``[B, N*K]`` with labels ``0..N-1``,
- ``query_x`` ``[B, N*Q, C, H, W]`` and ``query_y`` ``[B, N*Q]``,
- ``extra``: further per-task tensors with a leading task axis, e.g. ``"unlabeled_x"``
  ``[B, (N+D)*U, C, H, W]`` (semi-supervised episodes, with ``"unlabeled_y"``: the way of each unlabelled
  example, -1 for a distractor; methods must not train on it) and ``"attributes"`` ``[B, N, A]`` (the semantic
  vector of each way, when the data set has them).
- ``support_index`` ``[B, N*K]`` and ``query_index`` ``[B, N*Q]``: the position in the data set (its
  class-ordered images) of each support and query row, as :class:`EpisodeSampler` drew them (``None`` for
  episodes built otherwise). Evaluation from cached per-image features (:mod:`fewshot.evaluate`) looks the
  rows up by them.

Examples are ordered class by class (label ``n`` occupies rows ``n*K .. n*K+K-1``); the classes behind the
labels are a random draw per task, so label order carries no information. Sampling draws class choices
and image choices for all tasks at once from one ``torch.Generator`` and gathers with a single indexing
operation, on the device of the data.

A memory-mapped data set (:mod:`fewshot.data.mapped`) stays in its file: the indices are drawn the same way
(the same seed gives the same episodes as the in-memory set), then only the episode's images are read from
the file, moved to the device and converted to floats.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import torch

from .data.dataset import ClassDataset
from .data.images import to_float
from .errors import FewshotError


@dataclass
class Episode:
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int
    shots: int
    queries: int
    #: dataset class index of each way, ``[B, N]`` (for analysis and plots)
    classes: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
    #: dataset image index of each support row, ``[B, N*K]`` (None when not drawn from a ClassDataset)
    support_index: Optional[torch.Tensor] = None
    #: dataset image index of each query row, ``[B, N*Q]`` (None when not drawn from a ClassDataset)
    query_index: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.support_x.shape[0]

    def to(self, device=None, dtype=None) -> "Episode":
        def mv(t, is_x):
            if t is None:
                return t
            return t.to(device=device, dtype=dtype if (is_x and dtype is not None) else None)
        extra = {k: mv(v, k.endswith("_x")) if torch.is_tensor(v) else v for k, v in self.extra.items()}
        return replace(self, support_x=mv(self.support_x, True), query_x=mv(self.query_x, True),
                       support_y=mv(self.support_y, False), query_y=mv(self.query_y, False), extra=extra,
                       support_index=mv(self.support_index, False), query_index=mv(self.query_index, False))

    def task(self, i: int) -> "Episode":
        """Task ``i`` alone, keeping a task axis of size 1."""
        return self.tasks(slice(i, i + 1))

    def tasks(self, sl: slice) -> "Episode":
        """The tasks in ``sl`` (a slice of the task axis), extras included."""
        extra = {k: v[sl] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == self.batch else v
                 for k, v in self.extra.items()}
        return replace(self, support_x=self.support_x[sl], support_y=self.support_y[sl],
                       query_x=self.query_x[sl], query_y=self.query_y[sl],
                       classes=None if self.classes is None else self.classes[sl], extra=extra,
                       support_index=None if self.support_index is None else self.support_index[sl],
                       query_index=None if self.query_index is None else self.query_index[sl])


class EpisodeSampler:
    """Draws batches of N-way K-shot Q-query tasks from a :class:`ClassDataset`.

    Args:
        dataset: where the classes come from.
        ways, shots, queries: N, K and Q.
        batch: tasks per :class:`Episode` (the leading axis B).
        device: where the images live and episodes are built (the dataset's uint8 data is moved once).
        seed: seeds the sampler's own generator; the same seed gives the same episodes.
        dtype: float type of the images in episodes (scaled to [0, 1]); ``None`` keeps uint8.
        same_group: probability that a task draws all its ways from one group of the dataset (e.g. one
            alphabet): harder negatives, closer to within-alphabet tests. Groups with fewer than ``ways``
            classes are never chosen. 0 (default) samples classes from the whole dataset.
        float_cache_bytes: when the data converted to ``dtype`` fits in this many bytes, it is converted
            once up front so an episode is a single gather (the default, 1 GiB, covers Omniglot at 28x28
            with rotations many times over); larger data is converted per episode. A memory-mapped data set
            is never moved or converted whole.
        transform: optional callable applied to each episode's image tensors (augmentation), given
            ``(x, generator)`` with ``x`` of shape ``[B, M, C, H, W]``.
        unlabeled: U, unlabelled examples per way added to each task as ``extra["unlabeled_x"]``
            (semi-supervised episodes; drawn from the same classes, disjoint from support and query).
        distractors: D, extra classes per task that appear only among the unlabelled examples (U each).
    """

    def __init__(self, dataset: ClassDataset, ways: int, shots: int, queries: int, batch: int = 1,
                 device="cpu", seed: int = 0, dtype=torch.float32, transform=None,
                 same_group: float = 0.0, float_cache_bytes: int = 1 << 30, unlabeled: int = 0,
                 distractors: int = 0):
        for k, v in (("ways", ways), ("shots", shots), ("batch", batch)):
            if int(v) < 1:
                raise FewshotError(f"{k} must be at least 1, got {v}")
        for k, v in (("queries", queries), ("unlabeled", unlabeled), ("distractors", distractors)):
            if int(v) < 0:
                raise FewshotError(f"{k} must be at least 0, got {v}")
        if int(distractors) and not int(unlabeled):
            raise FewshotError("distractor classes only appear among unlabelled examples: set unlabeled > 0")
        self.unlabeled, self.distractors = int(unlabeled), int(distractors)
        self.dataset, self.ways, self.shots, self.queries, self.batch = dataset, int(ways), int(shots), \
            int(queries), int(batch)
        self.device = torch.device(device)
        self.dtype, self.transform = dtype, transform
        n_cls = len(dataset)
        if self.ways + self.distractors > n_cls:
            d = f" + {self.distractors} distractor classes" if self.distractors else ""
            raise FewshotError(f"asked for {self.ways} ways{d} but the data has only {n_cls} classes")
        need = self.shots + self.queries + self.unlabeled
        small = (dataset.counts < need).nonzero().flatten()
        if len(small):
            c = int(small[0])
            u = f" + {self.unlabeled} unlabelled" if self.unlabeled else ""
            raise FewshotError(f"class {dataset.names[c]!r} has {int(dataset.counts[c])} images but "
                               f"{self.shots} shots + {self.queries} queries{u} = {need} are needed per class "
                               f"({len(small)} class(es) too small)")
        self.image_shape = dataset.image_shape
        self.mapped = dataset.memory_mapped
        if self.mapped:       # read per episode from the file (see _gather)
            self.data = self.flat = None
            self.prescaled = False
        else:
            self.data = dataset.data.to(self.device)
            n_bytes = self.data.numel() * (torch.finfo(dtype).bits // 8 if dtype is not None else 1)
            self.prescaled = dtype is not None and (n_bytes <= float_cache_bytes or self.data.is_floating_point())
            if self.prescaled:
                self.data = to_float(self.data, dtype)
            self.flat = self.data.view(self.data.shape[0], -1)
        self.counts = dataset.counts.to(self.device)
        self.offsets = dataset.offsets.to(self.device)
        self.uniform = bool((dataset.counts == dataset.counts[0]).all())
        self.max_count = int(dataset.counts.max())
        self.seed = seed
        self.same_group = float(same_group)
        if self.same_group > 0:
            if dataset.groups is None:
                raise FewshotError("same_group sampling needs a data set with groups (e.g. Omniglot alphabets)")
            names = sorted(set(dataset.groups))
            gid = torch.tensor([names.index(g) for g in dataset.groups])
            sizes = torch.bincount(gid, minlength=len(names))
            self.eligible = (sizes >= self.ways).nonzero().flatten().to(self.device)
            if len(self.eligible) == 0:
                raise FewshotError(f"no group has {self.ways} classes; largest has {int(sizes.max())}")
            self.class_group = gid.to(self.device)
        self.attributes = dataset.attributes.to(self.device) if dataset.attributes is not None else None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    # ---------------------------------------------------------------- state for exact resume
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # ---------------------------------------------------------------- sampling
    def _indices(self, B: int) -> tuple:
        """Image indices ``[B, N+D, K+Q+U]`` into ``data`` and the class chosen for each way ``[B, N+D]``
        (the D distractor classes last)."""
        N, M, g = self.ways + self.distractors, self.shots + self.queries + self.unlabeled, self.generator
        n_cls = len(self.counts)
        keys = torch.rand(B, n_cls, generator=g, device=self.device)
        if self.same_group > 0:
            within = torch.rand(B, generator=g, device=self.device) < self.same_group
            pick = self.eligible[torch.randint(len(self.eligible), (B,), generator=g, device=self.device)]
            outside = within.unsqueeze(1) & (self.class_group.unsqueeze(0) != pick.unsqueeze(1))
            keys = keys.masked_fill(outside, -1.0)
        cls = keys.topk(N, dim=1, sorted=False).indices
        if self.uniform:
            cnt = self.max_count
            within = torch.rand(B, N, cnt, generator=g, device=self.device).argsort(dim=2)[:, :, :M]
        else:
            keys = torch.rand(B, N, self.max_count, generator=g, device=self.device)
            valid = torch.arange(self.max_count, device=self.device) < self.counts[cls].unsqueeze(-1)
            keys = keys.masked_fill(~valid, 2.0)
            within = keys.argsort(dim=2)[:, :, :M]
        return self.offsets[cls].unsqueeze(-1) + within, cls

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at data set positions ``index`` (any shape) -> ``[*index.shape, C, H, W]``, as episodes
        hold them: on the sampler's device, in the episode dtype, before any ``transform``."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.mapped:
            x = self.dataset.take(index.reshape(-1)).to(self.device)
            x = to_float(x, self.dtype) if self.dtype is not None else x
        else:
            x = self.flat.index_select(0, index.reshape(-1).to(self.device))
            if self.dtype is not None and not self.prescaled:
                x = to_float(x, self.dtype)
        return x.view(*index.shape, *self.image_shape)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Images at ``idx`` ``[B, N, M]`` -> ``[B, N*M, C, H, W]`` in the episode dtype."""
        return self.take(idx.reshape(idx.shape[0], -1))

    def sample(self, batch: Optional[int] = None) -> Episode:
        B = batch or self.batch
        N, K, Q = self.ways, self.shots, self.queries
        U, D = self.unlabeled, self.distractors
        idx, cls = self._indices(B)
        sidx, qidx = idx[:, :N, :K].reshape(B, N * K), idx[:, :N, K:K + Q].reshape(B, N * Q)
        sx, qx = self.take(sidx), self.take(qidx)
        if self.transform is not None:
            sx = self.transform(sx, self.generator)
            qx = self.transform(qx, self.generator)
        labels = torch.arange(N, device=self.device)
        sy = labels.repeat_interleave(K).expand(B, N * K)
        qy = labels.repeat_interleave(Q).expand(B, N * Q)
        extra = {}
        if U:
            # the ways' own unlabelled images, then U images of each distractor class
            uidx = torch.cat([idx[:, :N, K + Q:], idx[:, N:, :U]], dim=1)
            ux = self._gather(uidx)
            if self.transform is not None:
                ux = self.transform(ux, self.generator)
            uy = torch.cat([labels, torch.full((D,), -1, device=self.device, dtype=labels.dtype)])
            extra["unlabeled_x"] = ux
            extra["unlabeled_y"] = uy.repeat_interleave(U).expand(B, (N + D) * U)
        if self.attributes is not None:
            extra["attributes"] = self.attributes[cls[:, :N]]
        return Episode(sx, sy, qx, qy, N, K, Q, classes=cls[:, :N], extra=extra, support_index=sidx,
                       query_index=qidx)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def __repr__(self) -> str:
        u = f" {self.unlabeled}-unlabelled" if self.unlabeled else ""
        u += f" +{self.distractors} distractors" if self.distractors else ""
        m = ", memory-mapped" if self.mapped else ""
        return (f"EpisodeSampler({self.ways}-way {self.shots}-shot {self.queries}-query{u}, batch {self.batch}, "
                f"{len(self.dataset)} classes{m}, seed {self.seed}, device {self.device})")


def episodes(dataset: ClassDataset, ways: int, shots: int, queries: int = 15, batch: int = 1, device="cpu",
             seed: int = 0, **kw) -> EpisodeSampler:
    """Shorthand for :class:`EpisodeSampler`."""
    return EpisodeSampler(dataset, ways, shots, queries, batch=batch, device=device, seed=seed, **kw)
