"""ClassDataset: labelled examples grouped by class, held in memory as one tensor (uint8 images, or float32
features such as MFCCs).

Every loader returns one. Episodes are drawn from it by tensor indexing (see :mod:`fewshot.episodes`),
so the layout is a single contiguous ``data`` tensor ``[total, C, H, W]`` with the images of class ``c``
at ``data[offsets[c] : offsets[c] + counts[c]]``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import FewshotError
from .images import Preprocess

CACHE_VERSION = 1


class ClassDataset:
    """Images grouped by class.

    Args:
        data: uint8 tensor ``[total, C, H, W]`` (images, scaled to [0, 1] in episodes) or float32 (features
            used as they are, e.g. MFCC maps ``[total, 1, n_mfcc, frames]``), classes one after the other.
        counts: number of images of each class (sums to ``total``).
        names: one name per class (unique).
        groups: optional group per class (the alphabet for Omniglot, the script for glyphs).
        preprocess: how raw files were turned into these tensors (recorded in runs).
        source: free-form description of where the data came from.
        attributes: optional float tensor ``[classes, A]``: a semantic vector per class (attributes, word
            vectors) for zero-shot methods; episodes carry the vectors of their ways.
    """

    def __init__(self, data: torch.Tensor, counts: Sequence[int] | torch.Tensor, names: Sequence[str],
                 groups: Sequence[str] | None = None, preprocess: Preprocess | None = None, source: str = "",
                 attributes: torch.Tensor | None = None):
        counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1)
        if data.dtype not in (torch.uint8, torch.float32) or data.dim() != 4:
            raise ValueError(f"data must be uint8 or float32 [total, C, H, W], got {data.dtype} {tuple(data.shape)}")
        if int(counts.sum()) != data.shape[0]:
            raise ValueError(f"class counts sum to {int(counts.sum())} but data holds {data.shape[0]} images")
        if len(names) != len(counts):
            raise ValueError(f"{len(names)} names for {len(counts)} classes")
        if len(set(names)) != len(names):
            dup = next(n for n in names if list(names).count(n) > 1)
            raise ValueError(f"class names must be unique; {dup!r} appears twice")
        if groups is not None and len(groups) != len(names):
            raise ValueError(f"{len(groups)} groups for {len(names)} classes")
        for n, c in zip(names, counts.tolist()):
            if c == 0:
                raise FewshotError(f"class {n!r} has no images")
        self.data = data.contiguous()
        self.counts = counts
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
        self.names = list(names)
        self.groups = list(groups) if groups is not None else None
        self.preprocess = preprocess or Preprocess(size=tuple(data.shape[2:]), channels=data.shape[1])
        self.source = source
        if attributes is not None:
            attributes = torch.as_tensor(attributes, dtype=torch.float32)
            if attributes.dim() != 2 or attributes.shape[0] != len(self.names):
                raise ValueError(f"attributes must be [classes={len(self.names)}, A], got {tuple(attributes.shape)}")
        self.attributes = attributes

    def with_attributes(self, table: dict) -> "ClassDataset":
        """The same data with a semantic vector per class from ``{class name: vector}``; every class needs one."""
        missing = [n for n in self.names if n.split("@rot")[0] not in table]
        if missing:
            raise FewshotError(f"class {missing[0]!r} has no semantic vector ({len(missing)} of {len(self)} "
                               "classes missing)")
        vecs = torch.stack([torch.as_tensor(table[n.split("@rot")[0]], dtype=torch.float32) for n in self.names])
        return ClassDataset(self.data, self.counts, self.names, self.groups, self.preprocess, self.source, vecs)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_class_tensors(cls, images: Sequence[torch.Tensor], names: Sequence[str],
                           groups: Sequence[str] | None = None, preprocess: Preprocess | None = None,
                           source: str = "", attributes: torch.Tensor | None = None) -> "ClassDataset":
        """Build from one tensor ``[n_i, C, H, W]`` per class (uint8 images or float32 features)."""
        for n, im in zip(names, images):
            if im.shape[0] == 0:
                raise FewshotError(f"class {n!r} has no images")
        data = torch.cat(list(images)) if len(images) else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
        return cls(data, [im.shape[0] for im in images], names, groups, preprocess, source, attributes)

    # ---------------------------------------------------------------- basic access
    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_images(self) -> int:
        return self.data.shape[0]

    @property
    def image_shape(self) -> tuple:
        return tuple(self.data.shape[1:])

    def images(self, c: int) -> torch.Tensor:
        """Images (or feature maps) of class index ``c``."""
        o = int(self.offsets[c])
        return self.data[o:o + int(self.counts[c])]

    def labels(self) -> torch.Tensor:
        """Class index of every image, aligned with ``data``."""
        return torch.repeat_interleave(torch.arange(len(self)), self.counts)

    def group_names(self) -> list:
        if self.groups is None:
            return []
        return sorted(set(self.groups))

    def __repr__(self) -> str:
        g = f", {len(self.group_names())} groups" if self.groups else ""
        return (f"ClassDataset({len(self)} classes, {self.num_images} images of {self.image_shape}{g}"
                f"{', ' + self.source if self.source else ''})")

    # ---------------------------------------------------------------- subsets and splits
    def subset(self, classes: Iterable[int]) -> "ClassDataset":
        """A dataset with only the given class indices (in that order)."""
        classes = [int(c) for c in classes]
        if not classes:
            raise FewshotError("a split left no classes")
        parts = [self.images(c) for c in classes]
        groups = [self.groups[c] for c in classes] if self.groups is not None else None
        attrs = self.attributes[classes] if self.attributes is not None else None
        return ClassDataset.from_class_tensors(parts, [self.names[c] for c in classes], groups,
                                               self.preprocess, self.source, attrs)

    def split_by_group(self, test: Sequence[str], val: Sequence[str] = ()) -> tuple:
        """Split by group names (e.g. alphabets): returns (train, test) or (train, val, test)."""
        if self.groups is None:
            raise FewshotError("this data set has no groups; split by fraction or by class lists instead")
        known = set(self.groups)
        for g in list(test) + list(val):
            if g not in known:
                raise FewshotError(f"unknown group {g!r}; groups are: {', '.join(sorted(known))}")
        test, val = set(test), set(val)
        if test & val:
            raise FewshotError(f"groups in both test and val: {sorted(test & val)}")
        tr = [i for i, g in enumerate(self.groups) if g not in test and g not in val]
        te = [i for i, g in enumerate(self.groups) if g in test]
        va = [i for i, g in enumerate(self.groups) if g in val]
        out = [self.subset(tr)]
        if val:
            out.append(self.subset(va))
        out.append(self.subset(te))
        return tuple(out)

    def split_fraction(self, test: float = 0.1, val: float = 0.0, seed: int = 0) -> tuple:
        """Seeded random class split, e.g. ``test=0.1`` for 90-10. Returns (train, test) or (train, val, test)."""
        if not (0 < test < 1) or not (0 <= val < 1) or test + val >= 1:
            raise FewshotError(f"bad split fractions test={test} val={val}")
        n = len(self)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        n_te = max(1, round(n * test))
        n_va = round(n * val) if val > 0 else 0
        if val > 0:
            n_va = max(1, n_va)
        if n_te + n_va >= n:
            raise FewshotError(f"{n} classes are too few for a {test}/{val} split")
        te, va, tr = order[:n_te], order[n_te:n_te + n_va], order[n_te + n_va:]
        out = [self.subset(sorted(tr))]
        if n_va:
            out.append(self.subset(sorted(va)))
        out.append(self.subset(sorted(te)))
        return tuple(out)

    def split_by_names(self, *lists: Sequence[str]) -> tuple:
        """One dataset per list of class names (from class-list files)."""
        index = {n: i for i, n in enumerate(self.names)}
        out = []
        for lst in lists:
            missing = [n for n in lst if n not in index]
            if missing:
                raise FewshotError(f"class {missing[0]!r} from the class list is not in the data "
                                   f"({len(missing)} missing)")
            out.append(self.subset([index[n] for n in lst]))
        return tuple(out)

    def with_rotations(self, angles: Sequence[int] = (90, 180, 270)) -> "ClassDataset":
        """Add each class rotated by the given multiples of 90 degrees as new classes (training only)."""
        names, groups = list(self.names), list(self.groups) if self.groups else None
        for a in angles:
            if a % 90 != 0 or a % 360 == 0:
                raise FewshotError(f"rotation angles must be 90, 180 or 270, got {a}")
        data = [self.data] + [torch.rot90(self.data, (a // 90) % 4, dims=(2, 3)) for a in angles]
        for a in angles:
            names += [f"{n}@rot{a}" for n in self.names]
            if groups is not None:
                groups += list(self.groups)
        counts = torch.cat([self.counts] * (1 + len(angles)))
        attrs = torch.cat([self.attributes] * (1 + len(angles))) if self.attributes is not None else None
        return ClassDataset(torch.cat(data), counts, names, groups, self.preprocess, self.source, attrs)

    def relabel(self, labels: torch.Tensor, names: Sequence[str] | None = None) -> "ClassDataset":
        """Regroup every image by a new label array (e.g. cluster ids for unsupervised task construction)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (self.num_images,):
            raise ValueError(f"need one label per image ({self.num_images}), got {tuple(labels.shape)}")
        uniq = torch.unique(labels)
        order = torch.argsort(labels, stable=True)
        counts = torch.stack([(labels == u).sum() for u in uniq])
        names = list(names) if names is not None else [f"cluster{int(u)}" for u in uniq]
        return ClassDataset(self.data[order], counts, names, None, self.preprocess, self.source + " (relabelled)")

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write to a ``.pt`` file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"version": CACHE_VERSION, "data": self.data, "counts": self.counts, "names": self.names,
                    "groups": self.groups, "preprocess": self.preprocess.to_dict(), "source": self.source,
                    "attributes": self.attributes}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassDataset":
        d = torch.load(path, weights_only=True)
        if d.get("version") != CACHE_VERSION:
            raise ValueError("stale cache version")
        return cls(d["data"], d["counts"], d["names"], d["groups"], Preprocess.from_dict(d["preprocess"]),
                   d["source"], d.get("attributes"))


# -------------------------------------------------------------------- caching
def cache_dir() -> Path:
    return Path(os.environ.get("FEWSHOT_CACHE", Path.home() / ".cache" / "fewshot"))


def _fingerprint(sources: Sequence[Path], params: dict) -> str:
    h = hashlib.sha256()
    for s in sources:
        st = s.stat()
        h.update(f"{s.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def env_data_root(what: str, subfolders: Sequence[str]) -> Path:
    """The data root from ``FEWSHOT_DATA`` for a data set named ``what``: the first of ``subfolders`` that
    exists under it, or the variable's path itself; a one-line error when the variable is not set."""
    env = os.environ.get("FEWSHOT_DATA")
    if not env:
        raise FewshotError(f"no {what} path given: pass --data PATH or set FEWSHOT_DATA")
    p = Path(env)
    for sub in subfolders:
        if (p / sub).exists():
            return p / sub
    return p


def cached(sources: Sequence[Path], params: dict, build, tag: str, cache: str | os.PathLike | bool | None = None
           ) -> ClassDataset:
    """Load a dataset decoded earlier from ``sources`` with ``params``, or build and cache it.

    The cache file sits next to the first source (``.fewshot-cache/``) when that folder is writable,
    else in ``cache`` / ``$FEWSHOT_CACHE`` / ``~/.cache/fewshot``. ``cache=False`` disables caching.
    """
    if cache is False:
        return build()
    key = _fingerprint(sources, {**params, "v": CACHE_VERSION})
    fname = f"{tag}-{key}.pt"
    candidates = []
    if cache not in (None, True):
        candidates.append(Path(cache))
    else:
        first = sources[0]
        candidates.append((first.parent if first.is_file() else first) / ".fewshot-cache")
        candidates.append(cache_dir())
    for d in candidates:
        f = d / fname
        if f.is_file():
            try:
                return ClassDataset.load(f)
            except Exception:
                pass  # a corrupt or stale cache is rebuilt below
    ds = build()
    for d in candidates:
        try:
            ds.save(d / fname)
            break
        except OSError:
            continue
    return ds
