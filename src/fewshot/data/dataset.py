"""ClassDataset: labelled examples grouped by class, held in memory as one tensor (uint8 images, or float32
features such as MFCCs).

Every loader returns one. Episodes are drawn from it by tensor indexing (see :mod:`fewshot.episodes`),
so the layout is a single contiguous ``data`` tensor ``[total, C, H, W]`` with the images of class ``c``
at ``data[offsets[c] : offsets[c] + counts[c]]``.

A data set too large for memory is **memory-mapped** instead (:mod:`fewshot.data.mapped`): its images stay
in a cache file (a :class:`~fewshot.data.mapped.MappedImages`) and are read a few at a time. Then
:meth:`ClassDataset.images` and :meth:`ClassDataset.take` read only the rows asked for, subsets and
relabellings only re-index (``rows``: the file row of every image, class after class), and the episode
sampler gathers each episode's images from the file. Reading ``ds.data`` of such a set reads every image
into one in-memory tensor (what code that is not aware of mapping gets).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ..errors import FewshotError
from .images import Preprocess
from .mapped import MappedImages, Plan, mapped_cache, plan_of

CACHE_VERSION = 1
#: ``mmap: auto`` memory-maps a decoded data set larger than this many bytes (``$FEWSHOT_MMAP_BYTES``
#: overrides it): 2 GiB keeps mini-ImageNet (1.3 GB at 84 x 84), CUB and every smaller set in memory and maps
#: tiered-ImageNet (16.5 GB).
MMAP_AUTO_BYTES = 2 << 30
_MMAP: contextvars.ContextVar = contextvars.ContextVar("fewshot_mmap", default="auto")


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
        rows: memory-mapped data only: the row of ``data`` (a :class:`MappedImages`) of each image, class
            after class (``None``: every row in order).
    """

    def __init__(self, data, counts: Sequence[int] | torch.Tensor, names: Sequence[str],
                 groups: Sequence[str] | None = None, preprocess: Preprocess | None = None, source: str = "",
                 attributes: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1)
        if data.dtype not in (torch.uint8, torch.float32) or len(data.shape) != 4:
            raise ValueError(f"data must be uint8 or float32 [total, C, H, W], got {data.dtype} {tuple(data.shape)}")
        if rows is not None:
            if not isinstance(data, MappedImages):
                raise ValueError("rows index memory-mapped data only")
            rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        total = len(rows) if rows is not None else data.shape[0]
        if int(counts.sum()) != total:
            raise ValueError(f"class counts sum to {int(counts.sum())} but data holds {total} images")
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
        self._data = data if isinstance(data, MappedImages) else data.contiguous()
        self.rows = rows
        self.counts = counts
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
        self.names = list(names)
        self.groups = list(groups) if groups is not None else None
        self.preprocess = preprocess or Preprocess(size=tuple(data.shape[2:]), channels=int(data.shape[1]))
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
        return ClassDataset(self._data, self.counts, self.names, self.groups, self.preprocess, self.source, vecs,
                            self.rows)

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
    def memory_mapped(self) -> bool:
        """Whether the images stay in a cache file (:mod:`fewshot.data.mapped`) instead of memory."""
        return isinstance(self._data, MappedImages)

    @property
    def data(self) -> torch.Tensor:
        """All images ``[total, C, H, W]`` in class order; for a memory-mapped set, read whole into memory."""
        if isinstance(self._data, MappedImages):
            return self.take(torch.arange(self.num_images))
        return self._data

    @property
    def num_images(self) -> int:
        return int(self.rows.shape[0]) if self.rows is not None else int(self._data.shape[0])

    @property
    def image_shape(self) -> tuple:
        return tuple(self._data.shape[1:])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at positions ``index`` (into the class-ordered images), ``[len(index), C, H, W]``;
        a memory-mapped set reads only those rows from its file."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if isinstance(self._data, MappedImages):
            index = index.cpu()
            return self._data.gather(self._mapped_rows(index))
        return self._data.index_select(0, index.to(self._data.device))

    def images(self, c: int) -> torch.Tensor:
        """Images (or feature maps) of class index ``c``."""
        o = int(self.offsets[c])
        if isinstance(self._data, MappedImages):
            return self.take(torch.arange(o, o + int(self.counts[c])))
        return self._data[o:o + int(self.counts[c])]

    def _mapped_rows(self, index: torch.Tensor) -> torch.Tensor:
        """File rows of the images at ``index`` (memory-mapped sets)."""
        return self.rows[index] if self.rows is not None else index

    def labels(self) -> torch.Tensor:
        """Class index of every image, aligned with ``data``."""
        return torch.repeat_interleave(torch.arange(len(self)), self.counts)

    def group_names(self) -> list:
        if self.groups is None:
            return []
        return sorted(set(self.groups))

    def __repr__(self) -> str:
        g = f", {len(self.group_names())} groups" if self.groups else ""
        g += ", memory-mapped" if self.memory_mapped else ""
        return (f"ClassDataset({len(self)} classes, {self.num_images} images of {self.image_shape}{g}"
                f"{', ' + self.source if self.source else ''})")

    # ---------------------------------------------------------------- subsets and splits
    def subset(self, classes: Iterable[int]) -> "ClassDataset":
        """A dataset with only the given class indices (in that order)."""
        classes = [int(c) for c in classes]
        if not classes:
            raise FewshotError("a split left no classes")
        groups = [self.groups[c] for c in classes] if self.groups is not None else None
        attrs = self.attributes[classes] if self.attributes is not None else None
        if self.memory_mapped:         # re-index the file's rows; nothing is read
            index = torch.cat([torch.arange(int(self.offsets[c]), int(self.offsets[c] + self.counts[c]))
                               for c in classes])
            return ClassDataset(self._data, self.counts[classes], [self.names[c] for c in classes], groups,
                                self.preprocess, self.source, attrs, self._mapped_rows(index))
        parts = [self.images(c) for c in classes]
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
        if self.memory_mapped:
            raise FewshotError("--rotations would add three rotated copies of every training image in memory; it is "
                               "not available for a memory-mapped data set (set --mmap false if it fits memory)")
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
        if self.memory_mapped:
            return ClassDataset(self._data, counts, names, None, self.preprocess, self.source + " (relabelled)",
                                rows=self._mapped_rows(order))
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


def mmap_mode(value) -> Union[bool, str]:
    """``True``, ``False`` or ``"auto"`` from what a user wrote for ``mmap`` (``--mmap``)."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise FewshotError(f"--mmap must be auto, true or false, got {value!r}")


def mmap_threshold() -> int:
    """Bytes above which ``mmap: auto`` memory-maps (:data:`MMAP_AUTO_BYTES` or ``$FEWSHOT_MMAP_BYTES``)."""
    env = os.environ.get("FEWSHOT_MMAP_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise FewshotError(f"FEWSHOT_MMAP_BYTES must be a number of bytes, got {env!r}") from None
    return MMAP_AUTO_BYTES


@contextlib.contextmanager
def memory_mapping(mode):
    """Within this block, :func:`cached` (every loader) memory-maps as ``mode`` says (``True``, ``False`` or
    ``"auto"``) unless a loader is told otherwise; :func:`fewshot.data.load` sets it from ``--mmap``."""
    token = _MMAP.set(mmap_mode(mode))
    try:
        yield
    finally:
        _MMAP.reset(token)


def _mapped_name(tag: str, sources: Sequence[Path], params: dict) -> str:
    """The memory-mapped cache's file name: fixed for a source location and decoding parameters, so a changed
    source rewrites the same file (the source's sizes and times are checked through the header instead)."""
    h = hashlib.sha256(json.dumps([[str(s.resolve()) for s in sources], params], sort_keys=True).encode())
    return f"{tag}-{h.hexdigest()[:16]}.fsmm"


def _open_or_write_mapped(dirs: Sequence[Path], name: str, key: str, make_plan: Callable[[], Plan]) -> ClassDataset:
    """The mapped cache ``name`` in the first of ``dirs`` that has one (checked, rebuilt when stale), else
    written to the first writable one."""
    for d in dirs:
        if (d / name).is_file():
            try:
                return mapped_cache(d / name, key, make_plan)
            except OSError:
                continue
    plan = None
    for d in dirs:
        try:
            if plan is None:
                plan = make_plan()
            return mapped_cache(d / name, key, lambda: plan)
        except OSError as e:
            err = e
            continue
    raise FewshotError(f"cannot write the memory-mapped cache {name} into {', '.join(map(str, dirs))} ({err}); "
                       "set FEWSHOT_CACHE to a writable folder with room")


def cached(sources: Sequence[Path], params: dict, build, tag: str, cache: str | os.PathLike | bool | None = None,
           plan: Optional[Callable[[], Plan]] = None, mmap=None) -> ClassDataset:
    """Load a dataset decoded earlier from ``sources`` with ``params``, or build and cache it.

    The cache file sits next to the first source (``.fewshot-cache/``) when that folder is writable,
    else in ``cache`` / ``$FEWSHOT_CACHE`` / ``~/.cache/fewshot``. ``cache=False`` disables caching (and
    memory mapping).

    ``mmap`` (default: the mode set by :func:`memory_mapping`, ``"auto"`` outside one) chooses between a
    ``.pt`` cache loaded whole and a memory-mapped ``.fsmm`` cache (:mod:`fewshot.data.mapped`): ``True``
    always maps; ``"auto"`` maps when a mapped cache of this source is already there, when ``plan`` (a
    loader that can decode class by class into the file without holding the set) says the images exceed
    :func:`mmap_threshold`, or when a set built in memory turns out to exceed it; ``False`` never maps.
    """
    if cache is False:
        return build()
    mode = mmap_mode(_MMAP.get() if mmap is None else mmap)
    key = _fingerprint(sources, {**params, "v": CACHE_VERSION})
    fname = f"{tag}-{key}.pt"
    candidates = []
    if cache not in (None, True):
        candidates.append(Path(cache))
    else:
        first = sources[0]
        candidates.append((first.parent if first.is_file() else first) / ".fewshot-cache")
        candidates.append(cache_dir())
    if mode is not False:
        mname = _mapped_name(tag, sources, params)
        make_plan = plan if plan is not None else (lambda: plan_of(build()))
        if mode is True or any((d / mname).is_file() for d in candidates):
            return _open_or_write_mapped(candidates, mname, key, make_plan)
        if plan is not None:
            p = plan()
            if p.nbytes > mmap_threshold():
                return _open_or_write_mapped(candidates, mname, key, lambda: p)
    for d in candidates:
        f = d / fname
        if f.is_file():
            try:
                return ClassDataset.load(f)
            except Exception:
                pass  # a corrupt or stale cache is rebuilt below
    ds = build()
    if mode == "auto" and ds.data.dtype == torch.uint8 and ds.data.numel() > mmap_threshold():
        return _open_or_write_mapped(candidates, _mapped_name(tag, sources, params), key, lambda: plan_of(ds))
    for d in candidates:
        try:
            ds.save(d / fname)
            break
        except OSError:
            continue
    return ds
