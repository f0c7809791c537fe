"""Balanced pairs and triplets drawn from a :class:`ClassDataset` (Siamese networks, verification metrics).

- :class:`PairSampler` draws ``P`` pairs: ``P/2`` *genuine* pairs (two different images of one class,
  ``same = 1``) and ``P/2`` *impostor* pairs (one image from each of two different classes, ``same = 0``).
- :class:`TripletSampler` draws ``(anchor, positive, negative)``: anchor and positive are two different
  images of one class, the negative an image of another class.

Classes are drawn uniformly, then images uniformly within the class, from the sampler's own seeded
``torch.Generator``; every batch is gathered from the dataset's contiguous tensor with one indexing
operation per role (no Python loop over examples). The same seed gives the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FewshotError
from .dataset import ClassDataset
from .images import to_float


@dataclass
class Pairs:
    x1: torch.Tensor        #: ``[P, C, H, W]``
    x2: torch.Tensor        #: ``[P, C, H, W]``
    same: torch.Tensor      #: ``[P]`` 1 for a genuine pair (same class), 0 for an impostor pair
    class1: torch.Tensor    #: ``[P]`` dataset class index of ``x1``
    class2: torch.Tensor    #: ``[P]`` dataset class index of ``x2``
    index1: torch.Tensor    #: ``[P]`` row of ``x1`` in the dataset's ``data``
    index2: torch.Tensor    #: ``[P]`` row of ``x2``


@dataclass
class Triplets:
    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    anchor_class: torch.Tensor     #: ``[T]`` class of anchor and positive
    negative_class: torch.Tensor   #: ``[T]`` class of the negative
    anchor_index: torch.Tensor     #: ``[T]`` rows in the dataset's ``data``
    positive_index: torch.Tensor
    negative_index: torch.Tensor


class _ClassDraws:
    """Shared machinery: the dataset on a device, a seeded generator, and index draws."""

    def __init__(self, dataset: ClassDataset, batch: int, device="cpu", seed: int = 0, dtype=torch.float32):
        if int(batch) < 1:
            raise FewshotError(f"batch must be at least 1, got {batch}")
        if len(dataset) < 2:
            raise FewshotError(f"pairs and triplets need at least 2 classes, the data has {len(dataset)}")
        small = (dataset.counts < 2).nonzero().flatten()
        if len(small):
            c = int(small[0])
            raise FewshotError(f"class {dataset.names[c]!r} has {int(dataset.counts[c])} image but genuine "
                               f"pairs need 2 images per class ({len(small)} class(es) too small)")
        self.dataset, self.batch, self.seed = dataset, int(batch), int(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.data = dataset.data.to(self.device)
        self.counts = dataset.counts.to(self.device)
        self.offsets = dataset.offsets.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)

    def _classes(self, n: int) -> torch.Tensor:
        return torch.randint(len(self.dataset), (n,), generator=self.generator, device=self.device)

    def _other_classes(self, c: torch.Tensor) -> torch.Tensor:
        """A uniformly drawn class different from each of ``c``."""
        k = len(self.dataset)
        shift = torch.randint(1, k, c.shape, generator=self.generator, device=self.device)
        return (c + shift) % k

    def _image(self, c: torch.Tensor) -> torch.Tensor:
        """Within-class position of a uniform image of each class ``c``."""
        u = torch.rand(c.shape, generator=self.generator, device=self.device)
        return (u * self.counts[c]).long().clamp_max(self.counts[c] - 1)

    def _other_image(self, c: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """A uniform position in class ``c`` different from ``i`` (classes have at least 2 images)."""
        n = self.counts[c]
        u = torch.rand(c.shape, generator=self.generator, device=self.device)
        shift = 1 + (u * (n - 1)).long().clamp_max(n - 2)
        return (i + shift) % n

    def _rows(self, c: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self.offsets[c] + i

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.data[rows]
        return to_float(x, self.dtype) if self.dtype is not None else x

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class PairSampler(_ClassDraws):
    """Balanced genuine/impostor pairs from ``dataset``.

    Args:
        dataset: the classes (each needs at least 2 images; at least 2 classes).
        batch: pairs per :meth:`sample` (even: half genuine, half impostor; genuine pairs come first).
        device: where the data lives and pairs are built.
        seed: seeds the sampler's generator.
        dtype: float type of the images (scaled to [0, 1]); ``None`` keeps the stored dtype.
    """

    def __init__(self, dataset: ClassDataset, batch: int = 128, device="cpu", seed: int = 0,
                 dtype=torch.float32):
        if int(batch) < 2 or int(batch) % 2:
            raise FewshotError(f"pair batches must be even (half genuine, half impostor), got {batch}")
        super().__init__(dataset, batch, device, seed, dtype)

    def sample(self) -> Pairs:
        h = self.batch // 2
        cg = self._classes(h)                            # genuine: two different images of one class
        ig = self._image(cg)
        jg = self._other_image(cg, ig)
        ci = self._classes(h)                            # impostor: images of two different classes
        cj = self._other_classes(ci)
        ii, ji = self._image(ci), self._image(cj)
        c1, c2 = torch.cat([cg, ci]), torch.cat([cg, cj])
        r1 = torch.cat([self._rows(cg, ig), self._rows(ci, ii)])
        r2 = torch.cat([self._rows(cg, jg), self._rows(cj, ji)])
        same = torch.cat([torch.ones(h, dtype=torch.long, device=self.device),
                          torch.zeros(h, dtype=torch.long, device=self.device)])
        return Pairs(self._gather(r1), self._gather(r2), same, c1, c2, r1, r2)


class TripletSampler(_ClassDraws):
    """``(anchor, positive, negative)`` triplets from ``dataset``: anchor and positive are two different
    images of one class, the negative is an image of a different class.

    Args: as :class:`PairSampler`; ``batch`` is the number of triplets per :meth:`sample`.
    """

    def __init__(self, dataset: ClassDataset, batch: int = 128, device="cpu", seed: int = 0,
                 dtype=torch.float32):
        super().__init__(dataset, batch, device, seed, dtype)

    def sample(self) -> Triplets:
        ca = self._classes(self.batch)
        ia = self._image(ca)
        ip = self._other_image(ca, ia)
        cn = self._other_classes(ca)
        ineg = self._image(cn)
        ra, rp, rn = self._rows(ca, ia), self._rows(ca, ip), self._rows(cn, ineg)
        return Triplets(self._gather(ra), self._gather(rp), self._gather(rn), ca, cn, ra, rp, rn)
