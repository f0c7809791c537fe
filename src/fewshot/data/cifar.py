"""CIFAR-100 (Krizhevsky 2009) for few-shot learning, with the CIFAR-FS and FC100 class splits.

``cifar100(root)`` reads the official python release: ``cifar-100-python.tar.gz`` (read in memory, never
extracted to disk), its extracted ``cifar-100-python/`` folder (``train``, ``test``, ``meta``), or a folder
holding either. Few-shot splits are by class, so the official train (500 per class) and test (100 per
class) images are pooled: 100 fine classes x 600 RGB images of 32x32 pixels, class names from
``meta['fine_label_names']`` and, as each class's group, the name of its coarse label (superclass).

Named splits (``--split cifar-fs`` / ``--split fc100``), each (train, val, test):

* CIFAR-FS (Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable closed-form solvers",
  ICLR 2019): 64 / 16 / 20 fine classes chosen at random, so a superclass can appear in several parts. The
  published class lists ship with the package (``data/splits/cifar-fs/*.txt``).
* FC100 (Oreshkin, Rodriguez & Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot
  learning", NeurIPS 2018): split by superclass, 12 / 4 / 4 superclasses (60 / 20 / 20 fine classes), so
  test classes are semantically far from the training ones (``data/splits/fc100/*.txt``).

The pickles are read with :func:`fewshot.data.safepickle.load_pickle`, which only constructs plain containers
and numpy arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import FewshotError
from .dataset import ClassDataset, cached, env_data_root
from .images import Preprocess, as_size
from .download import fetch_checked
from .safepickle import load_pickle

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
#: The MD5 published on the CIFAR page (no SHA-256 is published by the authors).
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
PARTS = ("train", "test", "meta")
NATIVE_SIZE = (32, 32)
SPLITS_DIR = Path(__file__).with_name("splits")
#: named split -> kind of list ("classes": fine class names, "groups": superclass names)
NAMED_SPLITS = {"cifar-fs": "classes", "fc100": "groups"}


# -------------------------------------------------------------------- safe unpickling
def _unpickle(raw: bytes, label: str) -> dict:
    d = load_pickle(raw, label)
    if not isinstance(d, dict):
        raise FewshotError(f"{label} is not a CIFAR-100 pickle (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _names(values) -> list:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


# -------------------------------------------------------------------- finding the files
def find_source(root: str | os.PathLike) -> Path:
    """The archive or extracted folder to read for ``root`` (the archive, the folder, or a folder holding
    either); raises a FewshotError saying what is expected when there is none."""
    root = Path(root)
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return root
        raise FewshotError(f"{root} is not the CIFAR-100 archive ({ARCHIVE})")
    if not root.is_dir():
        raise FewshotError(f"no such file or folder: {root}")
    if all((root / p).is_file() for p in PARTS):
        return root
    if all((root / FOLDER / p).is_file() for p in PARTS):
        return root / FOLDER
    if (root / ARCHIVE).is_file():
        return root / ARCHIVE
    raise FewshotError(f"no CIFAR-100 data in {root}: expected {ARCHIVE} or a {FOLDER}/ folder with "
                       f"{', '.join(PARTS)} (download it from {URL})")


def is_cifar100(path: Path) -> bool:
    """Whether ``path`` is (or directly holds) the CIFAR-100 python release."""
    if path.is_file():
        return path.name == ARCHIVE
    return (path.is_dir() and (all((path / p).is_file() for p in PARTS) or (path / ARCHIVE).is_file()
                               or all((path / FOLDER / p).is_file() for p in PARTS)))


def _read_parts(source: Path) -> Dict[str, dict]:
    """{"train", "test", "meta"} -> unpickled dict, from the archive (in memory) or the folder."""
    out = {}
    if source.is_file():
        try:
            with tarfile.open(source, "r:*") as tf:
                for m in tf.getmembers():
                    part = m.name.rstrip("/").split("/")[-1]
                    if m.isfile() and part in PARTS and part not in out:
                        out[part] = _unpickle(tf.extractfile(m).read(), f"{source}:{m.name}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FewshotError(f"cannot read {source}: {e.__class__.__name__}: {e}") from None
    else:
        for p in PARTS:
            f = source / p
            if f.is_file():
                out[p] = _unpickle(f.read_bytes(), str(f))
    missing = [p for p in PARTS if p not in out]
    if missing:
        raise FewshotError(f"{source} lacks the CIFAR-100 file(s) {', '.join(missing)}")
    return out


def _images(d: dict, label: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    for k in ("data", "fine_labels", "coarse_labels"):
        if k not in d:
            raise FewshotError(f"{label} has no {k!r} entry: is it CIFAR-100 (not CIFAR-10)?")
    x = np.asarray(d["data"], dtype=np.uint8)
    fine, coarse = np.asarray(d["fine_labels"], dtype=np.int64), np.asarray(d["coarse_labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(fine) != len(x) or len(coarse) != len(x):
        raise FewshotError(f"{label}: expected data [n, 3072] with n fine and coarse labels, got "
                           f"{x.shape}, {len(fine)}, {len(coarse)}")
    return x.reshape(-1, 3, 32, 32), fine, coarse


def _resize(x: np.ndarray, size: tuple) -> np.ndarray:
    if tuple(size) == NATIVE_SIZE:
        return x
    h, w = size
    out = np.empty((len(x), 3, h, w), dtype=np.uint8)
    for i, im in enumerate(x):
        out[i] = np.asarray(Image.fromarray(im.transpose(1, 2, 0)).resize((w, h), Image.BILINEAR)).transpose(2, 0, 1)
    return out


def _build(source: Path, pre: Preprocess) -> ClassDataset:
    parts = _read_parts(source)
    meta = parts["meta"]
    if "fine_label_names" not in meta or "coarse_label_names" not in meta:
        raise FewshotError(f"{source}: meta has no fine_label_names/coarse_label_names")
    fine_names, coarse_names = _names(meta["fine_label_names"]), _names(meta["coarse_label_names"])
    xs, fs, cs = zip(*(_images(parts[p], f"{source}:{p}") for p in ("train", "test")))
    x, fine, coarse = np.concatenate(xs), np.concatenate(fs), np.concatenate(cs)
    if len(fine) and (fine.min() < 0 or fine.max() >= len(fine_names) or coarse.min() < 0
                      or coarse.max() >= len(coarse_names)):
        raise FewshotError(f"{source}: labels out of range of meta's label names")
    order = np.argsort(fine, kind="stable")   # class by class, train images before test images
    x, fine, coarse = _resize(x[order], pre.size), fine[order], coarse[order]
    present = np.unique(fine)
    groups = []
    for c in present:
        sup = np.unique(coarse[fine == c])
        if len(sup) != 1:
            raise FewshotError(f"{source}: class {fine_names[c]!r} has images in {len(sup)} superclasses")
        groups.append(coarse_names[int(sup[0])])
    counts = [int((fine == c).sum()) for c in present]
    return ClassDataset(torch.from_numpy(np.ascontiguousarray(x)), counts, [fine_names[c] for c in present],
                        groups, pre, source=f"cifar100:{source.name}")


def cifar100(root: str | os.PathLike | None = None, size=NATIVE_SIZE, cache=None,
             download: bool = False) -> ClassDataset:
    """Load CIFAR-100 as a :class:`ClassDataset`: 100 fine classes of 600 RGB images (train and test
    pooled), group = superclass name.

    Args:
        root: the archive, the extracted folder, or a folder holding either. Defaults to ``$FEWSHOT_DATA``
            (its ``cifar100/`` subfolder when there is one).
        size: output size (int or (h, w)); the native 32 keeps the published pixels.
        cache: see :func:`fewshot.data.dataset.cached`; ``False`` disables caching.
        download: fetch the official archive (MD5-checked) into ``root`` first when it is missing.
    """
    root = Path(root) if root is not None else default_root()
    if download and not is_cifar100(root):
        download_archive(root)
    source = find_source(root)
    pre = Preprocess(size=as_size(size), channels=3, invert=False)
    params = {"size": list(pre.size)}
    files = [source] if source.is_file() else [source / p for p in PARTS]  # not the folder: its mtime changes
    return cached(files, params, lambda: _build(source, pre), tag="cifar100", cache=cache)


def default_root() -> Path:
    """``FEWSHOT_DATA`` (or its ``cifar100``, ``cifar-100`` or ``cifar-100-python`` subfolder)."""
    return env_data_root("CIFAR-100", ("cifar100", "cifar-100", FOLDER))


def download_archive(root: str | os.PathLike, timeout: float = 20.0) -> Path:
    """Fetch the official ``cifar-100-python.tar.gz`` into ``root`` (no-op when present), checking its MD5.

    With no network this fails fast with a message saying where to put the file.
    """
    return fetch_checked(URL, Path(root) / ARCHIVE, "md5", MD5, timeout=timeout)


# -------------------------------------------------------------------- named splits
def split_lists(name: str) -> Tuple[list, list, list]:
    """The shipped (train, val, test) lists of a named split: fine class names for "cifar-fs", superclass
    names for "fc100"."""
    if name not in NAMED_SPLITS:
        raise FewshotError(f"unknown named split {name!r}; choose from {', '.join(NAMED_SPLITS)}")
    out = []
    for part in ("train", "val", "test"):
        f = SPLITS_DIR / name / f"{part}.txt"
        out.append([line.strip() for line in f.read_text().splitlines()
                    if line.strip() and not line.startswith("#")])
    return tuple(out)


def named_split(ds: ClassDataset, name: str) -> Tuple[ClassDataset, ClassDataset, ClassDataset]:
    """(train, val, test) of CIFAR-100 by a published split ("cifar-fs" or "fc100")."""
    train, val, test = split_lists(name)
    if NAMED_SPLITS[name] == "classes":
        missing = [n for n in train + val + test if n not in set(ds.names)]
        if missing:
            raise FewshotError(f"--split {name} needs CIFAR-100's fine classes; {missing[0]!r} is not in "
                               f"{ds.source or 'the data'} ({len(missing)} of 100 missing)")
        return ds.split_by_names(train, val, test)
    if ds.groups is None:
        raise FewshotError(f"--split {name} needs CIFAR-100 superclasses; {ds.source or 'the data'} has no groups")
    index = {}
    for i, g in enumerate(ds.groups):
        index.setdefault(g, []).append(i)
    missing = [g for g in train + val + test if g not in index]
    if missing:
        raise FewshotError(f"--split {name} needs CIFAR-100's superclasses; {missing[0]!r} is not in "
                           f"{ds.source or 'the data'} ({len(missing)} of 20 missing)")
    return tuple(ds.subset(sorted(i for g in part for i in index[g])) for part in (train, val, test))
