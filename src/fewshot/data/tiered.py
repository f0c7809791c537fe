"""tiered-ImageNet (Ren et al., "Meta-learning for semi-supervised few-shot classification", ICLR 2018): 608
ImageNet classes (779 165 images at 84 x 84) under 34 high-level categories, split by category into
351 / 97 / 160 train / val / test classes (20 / 6 / 8 categories).

The layout read here is the one Ren et al.'s code writes when it decompresses the release and most few-shot
code reads, in one folder:

* ``{train,val,test}_images.npz``: an ``np.savez`` archive whose array ``images`` is uint8
  ``[N, 84, 84, 3]``;
* ``{train,val,test}_labels.pkl``: a dict with ``label_specific`` (the class index of every image, ``[N]``),
  ``label_specific_str`` (one ImageNet id per class index, e.g. ``n01530575``), ``label_general`` (the
  category index of every image) and ``label_general_str`` (the category names). Python 2 pickles (keys and
  strings as bytes) are read too, through :func:`fewshot.data.safepickle.load_pickle`, so a tampered file
  cannot run code.

Classes are the ImageNet ids, ordered train, val, test and by class index within a split; every class's
group is its split name (``"train"``, ``"val"``, ``"test"``), so the run's ``--split auto`` (and
``--split published``) use the published split, as for mini-ImageNet. (The category of a class is not
kept.)

Decoded, the set is 16.5 GB: it is cached as a memory-mapped file (:mod:`fewshot.data.mapped`) whenever it
exceeds ``mmap: auto``'s threshold, written class after class straight from the archives, which are read in
blocks of images and never held whole. ``download_tiered_imagenet`` fetches Ren et al.'s release
(``tiered-imagenet.tar``, PNG pickles) and writes the ``.npz`` files from it.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from ..errors import FewshotError
from .dataset import ClassDataset, cached, env_data_root
from .images import Preprocess, as_size
from .mapped import Plan
from .miniimagenet import _convert_array
from .safepickle import load_pickle

SPLITS = ("train", "val", "test")
IMAGES = "{}_images.npz"
LABELS = "{}_labels.pkl"
PNG_PICKLE = "{}_images_png.pkl"
NATIVE_SIZE = (84, 84)
#: Ren et al.'s release (PNG pickles + label pickles) on Google Drive, as linked from their code
#: (renmengye/few-shot-ssl-public); the MD5 is the one public download scripts check for this file.
RELEASE_URL = "https://drive.usercontent.google.com/download?id=1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07&export=download&confirm=t"
RELEASE = "tiered-imagenet.tar"
RELEASE_MD5 = "e07e811b9f29362d159a9edd0d838c62"
BLOCK = 2048     # images read from an archive at a time


# ------------------------------------------------------------------------------------------ finding the files
def find_files(root: str | os.PathLike) -> Dict[str, Tuple[Path, Path]]:
    """``{split: (images .npz, labels .pkl)}`` for the splits under ``root`` (the folder, or a folder holding
    ``tiered-imagenet/``); a one-line error saying what is expected when there are none or a half."""
    root = Path(root)
    if not root.is_dir():
        raise FewshotError(f"no such folder: {root}")
    if not any((root / IMAGES.format(s)).is_file() for s in SPLITS) and (root / "tiered-imagenet").is_dir():
        root = root / "tiered-imagenet"
    out = {}
    for s in SPLITS:
        im, lab = root / IMAGES.format(s), root / LABELS.format(s)
        if im.is_file() != lab.is_file():
            have, lack = (im, lab) if im.is_file() else (lab, im)
            raise FewshotError(f"tiered-ImageNet in {root}: {have.name} is there but {lack.name} is missing")
        if im.is_file():
            out[s] = (im, lab)
    if not out:
        raise FewshotError(f"no tiered-ImageNet in {root}: expected {IMAGES.format('{train,val,test}')} with "
                           f"{LABELS.format('{train,val,test}')}")
    return out


def is_tiered_imagenet(path: str | os.PathLike) -> bool:
    try:
        find_files(path)
        return True
    except FewshotError:
        return False


def default_root() -> Path:
    """``FEWSHOT_DATA`` (or its ``tiered-imagenet``, ``tieredimagenet``, ``tiered_imagenet`` or
    ``tieredImageNet`` subfolder)."""
    return env_data_root("tiered-ImageNet", ("tiered-imagenet", "tieredimagenet", "tiered_imagenet",
                                             "tieredImageNet"))


# ------------------------------------------------------------------------------------------ reading
def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_labels(path: Path) -> Tuple[np.ndarray, list]:
    """(class index of every image ``[N]`` int64, class names) of one labels pickle, checked."""
    d = load_pickle(path)
    if isinstance(d, dict):
        d = {_text(k): v for k, v in d.items()}
    if not isinstance(d, dict) or "label_specific" not in d or "label_specific_str" not in d:
        raise FewshotError(f"{path} is not a tiered-ImageNet labels pickle (expected a dict with "
                           "'label_specific' and 'label_specific_str')")
    try:
        labels = np.asarray(d["label_specific"], dtype=np.int64).reshape(-1)
        names = [_text(n) for n in d["label_specific_str"]]
    except (TypeError, ValueError):
        raise FewshotError(f"{path}: 'label_specific' must be class indices and 'label_specific_str' their "
                           "names") from None
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise FewshotError(f"{path}: class index {int(labels.max() if labels.max() >= len(names) else labels.min())}"
                           f" outside 'label_specific_str' (0..{len(names) - 1})")
    if len(set(names)) != len(names):
        raise FewshotError(f"{path}: 'label_specific_str' names a class twice")
    return labels, names


class _NpzImages:
    """The ``images`` array of an ``np.savez`` archive, read in blocks of rows without loading it whole."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            if "images.npy" not in self.zip.namelist():
                raise FewshotError(f"{path} has no 'images' array (arrays: "
                                   f"{', '.join(n[:-4] for n in self.zip.namelist()) or 'none'})")
            self.fh = self.zip.open("images.npy")
            version = np.lib.format.read_magic(self.fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(self.fh)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise FewshotError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise FewshotError(f"{path}: 'images' must be uint8 [N, H, W, 3] in C order, got {dtype} {shape}")
        self.shape = tuple(int(s) for s in shape)
        self.done = 0

    def next(self, n: int) -> np.ndarray:
        n = min(n, self.shape[0] - self.done)
        row = int(np.prod(self.shape[1:]))
        buf = self.fh.read(n * row)
        if len(buf) != n * row:
            raise FewshotError(f"{self.path} is truncated: 'images' ends after {self.done + len(buf) // row} of "
                               f"{self.shape[0]} images")
        self.done += n
        return np.frombuffer(buf, dtype=np.uint8).reshape(n, *self.shape[1:])

    def close(self):
        self.fh.close()
        self.zip.close()


def npz_shape(path: Path) -> tuple:
    """Shape of the ``images`` array of an ``.npz`` (read from its header only)."""
    a = _NpzImages(path)
    try:
        return a.shape
    finally:
        a.close()


def _layout(files: Dict[str, Tuple[Path, Path]]) -> tuple:
    """(per split: (labels, per-split class order), names, groups, counts, image shape)."""
    per, names, groups, counts, shape = {}, [], [], [], None
    for s in SPLITS:
        if s not in files:
            continue
        im, lab = files[s]
        labels, cls_names = read_labels(lab)
        sh = npz_shape(im)
        if sh[0] != len(labels):
            raise FewshotError(f"{im} holds {sh[0]} images but {lab.name} labels {len(labels)}")
        if shape is not None and sh[1:] != shape[1:]:
            raise FewshotError(f"{im} holds images of {sh[1:3]}, the other splits {shape[1:3]}")
        shape = sh
        n = np.bincount(labels, minlength=len(cls_names))
        present = [c for c in range(len(cls_names)) if n[c]]
        for c in present:
            if cls_names[c] in names:
                raise FewshotError(f"tiered-ImageNet: class {cls_names[c]} is in two splits (the {s} split again)")
        per[s] = (labels, present)
        names += [cls_names[c] for c in present]
        groups += [s] * len(present)
        counts += [int(n[c]) for c in present]
    return per, names, groups, counts, shape


def _fill(files, per, pre: Preprocess):
    """``fill(write)`` for a :class:`Plan`: every split's archive read once in blocks, each image written at
    its row of the class-ordered cache."""
    def fill(write):
        start = 0
        for s in SPLITS:
            if s not in per:
                continue
            labels, present = per[s]
            # destination row of every image of this split: class after class (in the split's class order),
            # file order within a class; i.e. its position once the split is stably sorted by class
            rank = np.full(int(labels.max()) + 1 if labels.size else 0, -1, dtype=np.int64)
            rank[present] = np.arange(len(present))
            order = np.argsort(rank[labels], kind="stable")
            dest = np.empty(len(labels), dtype=np.int64)
            dest[order] = start + np.arange(len(labels))
            src = _NpzImages(files[s][0])
            try:
                for i in range(0, len(labels), BLOCK):
                    x = src.next(BLOCK)
                    write(_convert_array(x, pre).numpy(), dest[i:i + len(x)])
            finally:
                src.close()
            start += len(labels)
    return fill


def tiered_imagenet(root: str | os.PathLike | None = None, size: int | Sequence[int] = NATIVE_SIZE,
                    channels: int = 3, invert: bool = False, cache: str | os.PathLike | bool | None = None,
                    mmap=None) -> ClassDataset:
    """Load tiered-ImageNet (see the module docstring); group = split name.

    Args:
        root: the folder of ``.npz`` and ``.pkl`` files; defaults to ``$FEWSHOT_DATA`` (:func:`default_root`).
        size: output size (int or (h, w)); 84 keeps the published pixels.
        channels: 3 (RGB, the default) or 1 (grey).
        invert: store ``255 - value``.
        cache: see :func:`fewshot.data.dataset.cached`; ``False`` disables caching (and memory mapping).
        mmap: ``True``, ``False`` or ``"auto"`` (see :func:`fewshot.data.dataset.cached`); ``None`` follows
            :func:`fewshot.data.dataset.memory_mapping` (``"auto"``: mapped above 2 GiB, so the full set is).

    Raises:
        FewshotError: a missing or malformed file (named), a labels pickle that does not match its images, a
            class in two splits.
    """
    root = Path(root) if root is not None else default_root()
    files = find_files(root)
    if channels not in (1, 3):
        raise FewshotError(f"channels must be 1 or 3, got {channels}")
    pre = Preprocess(size=as_size(size), channels=int(channels), invert=bool(invert))
    params = {"pre": pre.to_dict(), "splits": sorted(files)}
    sources = [p for s in SPLITS if s in files for p in files[s]]
    source = f"tiered-imagenet:{next(iter(files.values()))[0].parent.name}"

    def plan() -> Plan:
        per, names, groups, counts, shape = _layout(files)
        full = (sum(counts), pre.channels, *pre.size)
        return Plan(full, counts, names, groups, pre, source, _fill(files, per, pre))

    def build() -> ClassDataset:
        p = plan()
        data = torch.empty(p.shape, dtype=torch.uint8)
        flat = data.numpy()

        def write(chunk, rows):
            flat[rows] = chunk
        p.fill(write)
        return ClassDataset(data, p.counts, p.names, p.groups, pre, source)

    return cached(sources, params, build, tag="tiered-imagenet", cache=cache, plan=plan, mmap=mmap)


# ------------------------------------------------------------------------------------------ download
def download_tiered_imagenet(root: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Fetch Ren et al.'s ``tiered-imagenet.tar`` into ``root`` (MD5-checked), extract it and write the
    ``{split}_images.npz`` files from its ``{split}_images_png.pkl`` (each a list of PNG-encoded images;
    one split's pickle is read into memory at a time, a few GB). Returns the folder to pass as ``--data``.
    Needs internet and ImageNet's terms of use accepted; with no network it fails with one line."""
    from PIL import Image
    import io
    from .download import extract_tar, fetch_checked
    root = Path(root)
    folder = root / "tiered-imagenet"
    if is_tiered_imagenet(folder) and all((folder / IMAGES.format(s)).is_file() for s in SPLITS):
        return folder
    if not all((folder / PNG_PICKLE.format(s)).is_file() for s in SPLITS):
        archive = fetch_checked(RELEASE_URL, root / RELEASE, "md5", RELEASE_MD5, timeout=timeout)
        extract_tar(archive, root)
    for s in SPLITS:
        out = folder / IMAGES.format(s)
        if out.is_file():
            continue
        pngs = load_pickle(folder / PNG_PICKLE.format(s))
        if not isinstance(pngs, (list, tuple)):
            raise FewshotError(f"{folder / PNG_PICKLE.format(s)} is not a list of PNG images")
        images = np.stack([np.asarray(Image.open(io.BytesIO(np.asarray(b, dtype=np.uint8).tobytes()))
                                      .convert("RGB")) for b in pngs])
        tmp = out.with_name(out.name + ".part.npz")
        np.savez(tmp, images=images)
        os.replace(tmp, out)
        del images, pngs
    return folder

