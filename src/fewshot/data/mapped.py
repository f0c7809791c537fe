"""Decoded data sets cached as one memory-mapped uint8 file, read a few images at a time.

A data set larger than memory (tiered-ImageNet decodes to 16.5 GB at 84 x 84) cannot be held as one tensor.
It is decoded once into a cache file and sampled from there: :class:`MappedImages` opens the file and
gathers the rows an episode asks for through memory maps of bounded windows of the file, so neither the
address space nor the resident memory of the process grows with the file (at most ``resident_bytes`` of
it is mapped at once; windows are unmapped least recently used first, which also drops their pages from
the process's resident set).

The file: ``MAGIC`` (8 bytes), the length of a JSON header (8 bytes, little endian), the header, zero
padding to a multiple of 4096 bytes, then the images as C-contiguous uint8 ``[N, C, H, W]``. The header
holds the format version (:data:`FORMAT_VERSION`), the shape, the fingerprint of the source the images
were decoded from (paths, sizes and modification times plus the decoding parameters), and the class
layout (counts, names, groups, preprocessing, source). :func:`open_cache` refuses a file whose magic,
version, fingerprint or size is not what it should be (a truncated file, a file from another version of the
source or of this format) with :class:`CacheInvalid`, and :func:`mapped_cache` then rebuilds it, saying
why in one line on stderr. The bytes of the images themselves are not checksummed (reading 16 GB on every
start would cost more than decoding a small set).

A cache is written to a temporary file beside its final name, flushed and fsynced, then renamed over it
(and the folder fsynced), so a crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import FewshotError

MAGIC = b"FSMMAP\x00\x01"
FORMAT_VERSION = 1
ALIGN = 4096
#: default bound on the bytes of a cache file mapped at once by one :class:`MappedImages`
RESIDENT_BYTES = 512 << 20
#: default size of one mapped window
WINDOW_BYTES = 32 << 20


class CacheInvalid(Exception):
    """A cache file that cannot be used as it is; the message says why in a few words."""


# ------------------------------------------------------------------------------------------ reading
class MappedImages:
    """Read-only uint8 images ``[N, C, H, W]`` stored at byte ``offset`` of ``path``.

    :meth:`gather` copies the requested rows out of memory maps of windows of the file (about
    ``window_bytes`` each, whole images only); at most ``resident_bytes`` of windows stay mapped.
    """

    def __init__(self, path: str | os.PathLike, offset: int, shape: Sequence[int],
                 resident_bytes: int = RESIDENT_BYTES, window_bytes: int = WINDOW_BYTES):
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = torch.Size(int(s) for s in shape)
        self.dtype = torch.uint8
        self.row_bytes = int(np.prod(self.shape[1:]))
        self.rows_per_window = max(1, int(window_bytes) // max(1, self.row_bytes))
        window = self.rows_per_window * self.row_bytes
        self.max_windows = max(1, int(resident_bytes) // window)
        self._file = open(self.path, "rb")
        self._windows: "OrderedDict[int, tuple]" = OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def _window(self, w: int) -> tuple:
        """(mmap, byte offset of the window's first row inside it, rows) of window ``w``, mapped on demand."""
        hit = self._windows.get(w)
        if hit is not None:
            self._windows.move_to_end(w)
            return hit
        while len(self._windows) >= self.max_windows:
            _, (old, _, _) = self._windows.popitem(last=False)
            old.close()
        first = w * self.rows_per_window
        rows = min(self.rows_per_window, self.shape[0] - first)
        start = self.offset + first * self.row_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self._file.fileno(), start - aligned + rows * self.row_bytes, access=mmap.ACCESS_READ,
                      offset=aligned)
        entry = (m, start - aligned, rows)
        self._windows[w] = entry
        return entry

    def gather(self, rows) -> torch.Tensor:
        """The images at ``rows`` (any integer sequence or tensor, any order, repeats allowed) as a new
        uint8 tensor ``[len(rows), C, H, W]``."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu().numpy()
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        if len(rows):
            if rows.min() < 0 or rows.max() >= self.shape[0]:
                raise IndexError(f"row index out of range 0..{self.shape[0] - 1}")
            win = rows // self.rows_per_window
            order = np.argsort(win, kind="stable")
            bounds = np.flatnonzero(np.diff(win[order])) + 1
            for part in np.split(order, bounds):
                w = int(win[part[0]])
                m, start, n = self._window(w)
                view = np.frombuffer(m, dtype=np.uint8, count=n * self.row_bytes, offset=start)
                out[part] = view.reshape(n, self.row_bytes)[rows[part] - w * self.rows_per_window]
                del view                    # the map can only be closed once no array looks into it
        return torch.from_numpy(out).view(len(rows), *self.shape[1:])

    def release(self) -> None:
        """Unmap every window (the next :meth:`gather` maps what it needs again)."""
        while self._windows:
            _, (m, _, _) = self._windows.popitem(last=False)
            m.close()

    def close(self) -> None:
        self.release()
        self._file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        return {"path": str(self.path), "offset": self.offset, "shape": list(self.shape),
                "resident_bytes": self.max_windows * self.rows_per_window * self.row_bytes,
                "window_bytes": self.rows_per_window * self.row_bytes}

    def __setstate__(self, s):
        self.__init__(s["path"], s["offset"], s["shape"], s["resident_bytes"], s["window_bytes"])

    def __repr__(self) -> str:
        return f"MappedImages({self.path}, {tuple(self.shape)})"


def read_header(path: str | os.PathLike) -> tuple:
    """(header dict, byte offset of the images) of a cache file, checked against its size.

    Raises:
        CacheInvalid: not a cache file, another format version, or truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise CacheInvalid("it is not a fewshot cache file" if len(head) >= 16 else
                               f"it is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head[8:])
        if 16 + n > size:
            raise CacheInvalid(f"it is truncated ({size} bytes, header alone is {16 + n})")
        try:
            meta = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CacheInvalid("its header is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CacheInvalid(f"it has cache format version {found}, this fewshot reads {FORMAT_VERSION}")
    offset = _aligned(16 + n)
    want = offset + int(np.prod(meta["shape"]))
    if size != want:
        raise CacheInvalid(f"it is truncated ({size} of {want} bytes)" if size < want
                           else f"it is {size} bytes, {want} expected")
    return meta, offset


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def open_cache(path: str | os.PathLike, fingerprint: Optional[str] = None, resident_bytes: int = RESIDENT_BYTES):
    """The :class:`~fewshot.data.dataset.ClassDataset` stored in a cache file, memory-mapped.

    Raises:
        CacheInvalid: see :func:`read_header`; or the file's source fingerprint is not ``fingerprint``.
    """
    from .dataset import ClassDataset
    from .images import Preprocess
    meta, offset = read_header(path)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CacheInvalid("it was built from another version of the source")
    images = MappedImages(path, offset, meta["shape"], resident_bytes=resident_bytes)
    return ClassDataset(images, meta["counts"], meta["names"], meta["groups"],
                        Preprocess.from_dict(meta["preprocess"]), meta["source"])


# ------------------------------------------------------------------------------------------ writing
@dataclass
class Plan:
    """What a loader will write into a cache, known before decoding: the shape ``[N, C, H, W]`` and class
    layout, and ``fill(write)``, which decodes the images and hands them over as uint8 arrays
    ``[n, C, H, W]`` (any chunking): ``write(chunk)`` puts them after the previous chunk (class after class),
    ``write(chunk, rows)`` at the given rows of the class-ordered file (for sources stored in another order).
    Every row must be written exactly once."""
    shape: tuple
    counts: list
    names: list
    groups: Optional[list]
    preprocess: object
    source: str
    fill: Callable[[Callable[[np.ndarray], None]], None]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


def plan_of(ds) -> Plan:
    """A :class:`Plan` that writes an in-memory uint8 :class:`ClassDataset` as it is."""
    if ds.data.dtype != torch.uint8:
        raise FewshotError("only uint8 images can be memory-mapped; this data set holds float features")

    def fill(write):
        step = max(1, (64 << 20) // max(1, int(np.prod(ds.image_shape))))
        for i in range(0, ds.num_images, step):
            write(ds.data[i:i + step].numpy())
    return Plan(tuple(ds.data.shape), ds.counts.tolist(), ds.names, ds.groups, ds.preprocess, ds.source, fill)


def write_cache(path: str | os.PathLike, fingerprint: str, plan: Plan) -> None:
    """Write ``plan``'s images to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "shape": [int(s) for s in plan.shape], "fingerprint": fingerprint,
            "counts": [int(c) for c in plan.counts], "names": list(plan.names),
            "groups": list(plan.groups) if plan.groups is not None else None,
            "preprocess": plan.preprocess.to_dict(), "source": plan.source}
    if sum(meta["counts"]) != meta["shape"][0]:
        raise ValueError(f"class counts sum to {sum(meta['counts'])} but the plan has {meta['shape'][0]} images")
    head = json.dumps(meta).encode("utf-8")
    prefix = MAGIC + struct.pack("<Q", len(head)) + head
    prefix += b"\0" * (_aligned(len(prefix)) - len(prefix))
    row_shape = tuple(meta["shape"][1:])
    total, row_bytes, base = meta["shape"][0], int(np.prod(row_shape)), len(prefix)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    filled = np.zeros(total, dtype=bool)
    cursor = 0
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            f.flush()
            fd = f.fileno()

            def write(chunk: np.ndarray, rows=None) -> None:
                nonlocal cursor
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != np.uint8 or tuple(chunk.shape[1:]) != row_shape:
                    raise ValueError(f"cache chunk must be uint8 [n, {', '.join(map(str, row_shape))}], got "
                                     f"{chunk.dtype} {tuple(chunk.shape)}")
                if rows is None:
                    rows = np.arange(cursor, cursor + len(chunk))
                    cursor += len(chunk)
                rows = np.asarray(rows, dtype=np.int64).reshape(-1)
                if len(rows) != len(chunk):
                    raise ValueError(f"{len(chunk)} images for {len(rows)} rows")
                if len(rows) and (rows.min() < 0 or rows.max() >= total or filled[rows].any()
                                  or len(np.unique(rows)) != len(rows)):
                    raise ValueError(f"cache rows written twice or outside the planned {total} images")
                filled[rows] = True
                flat = chunk.reshape(len(chunk), -1)
                runs = np.flatnonzero(np.diff(rows) != 1) + 1       # consecutive rows: one write each run
                for part in np.split(np.arange(len(rows)), runs):
                    if len(part):
                        os.pwrite(fd, flat[part[0]:part[-1] + 1].data, base + int(rows[part[0]]) * row_bytes)
            plan.fill(write)
            if not filled.all():
                raise ValueError(f"{int(filled.sum())} of the planned {total} images were written")
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass    # folders that cannot be opened for fsync (some file systems): the rename is still atomic


def mapped_cache(path: Path, fingerprint: str, plan: Callable[[], Plan], resident_bytes: int = RESIDENT_BYTES,
                 quiet: bool = False):
    """Open the cache at ``path`` if it holds images decoded from this very source (``fingerprint``), else
    decode them (``plan()``), write the cache atomically and open that. A file that is there but unusable
    (truncated, from another source version or format) is rebuilt with a one-line message on stderr."""
    if path.is_file():
        try:
            return open_cache(path, fingerprint, resident_bytes)
        except CacheInvalid as e:
            if not quiet:
                print(f"fewshot: rebuilding the memory-mapped cache {path}: {e}", file=sys.stderr, flush=True)
    write_cache(path, fingerprint, plan())
    return open_cache(path, fingerprint, resident_bytes)
