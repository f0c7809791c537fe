"""mini-ImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017), in the layouts users
have:

* the **CSV layout** of Ravi & Larochelle's release: ``ROOT/images/<file>.jpg`` and ``ROOT/train.csv``,
  ``val.csv``, ``test.csv``, each a header line then ``filename,label`` rows (64 / 16 / 20 classes x 600
  images). File names are looked up in ``ROOT/images``, then in ``ROOT`` (for sheets that say
  ``images/<file>.jpg``).
* the widely shared **pickles** ``ROOT/mini-imagenet-cache-{train,val,test}.pkl``: each a dict with
  ``"image_data"``, a uint8 array ``[N, 84, 84, 3]``, and ``"class_dict"``, ``{class id: [indices]}``. They
  are read with :func:`fewshot.data.safepickle.load_pickle`, so a tampered file cannot run code.

Either gives a :class:`ClassDataset` of RGB images (84 x 84 native; ``size`` resizes) in which every
class's group is the name of its split, ``"train"``, ``"val"`` or ``"test"``, as the files say. That is how
the published split travels with the data: the run's default split (``"auto"``) and ``--split published``
use :func:`published_split`, which takes the run's train/val/test classes from those groups; any other
``--split`` ignores them. Classes are ordered train, val, test, sorted by id within each, and the two layouts
give the same class order.

Decoded images are cached (:func:`fewshot.data.dataset.cached`); the cache key covers the CSVs and the
``images/`` folder (an added or removed image changes it), or the pickles.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import FewshotError
from .dataset import ClassDataset, cached, env_data_root
from .images import Preprocess, as_size, convert
from .labeled import decode_classes, natural_key, read_sheet, resolve_rows
from .safepickle import load_pickle

#: The split names, in the order their classes are stored; also the group names classes carry.
SPLITS = ("train", "val", "test")
PICKLE = "mini-imagenet-cache-{}.pkl"
NATIVE_SIZE = (84, 84)
_PICKLE_NAME = re.compile(r"^mini-imagenet-cache-(train|val|test)\.pkl$")


# ------------------------------------------------------------------------------------------ finding the files
def find_layout(root: str | os.PathLike) -> Tuple[str, Dict[str, Path]]:
    """``("csv", {split: csv file})`` or ``("pickle", {split: pkl file})`` for the splits present under
    ``root`` (the data folder, or one ``mini-imagenet-cache-SPLIT.pkl`` file). A folder holding both
    layouts is read as the CSV layout.

    Raises:
        FewshotError: there is no mini-ImageNet at ``root`` (saying what is expected).
    """
    root = Path(root)
    if root.is_file():
        m = _PICKLE_NAME.match(root.name)
        if not m:
            raise FewshotError(f"{root} is not a mini-ImageNet file (expected {PICKLE.format('SPLIT')})")
        return "pickle", {m.group(1): root}
    if not root.is_dir():
        raise FewshotError(f"no such file or folder: {root}")
    csvs = {s: root / f"{s}.csv" for s in SPLITS if (root / f"{s}.csv").is_file()}
    if csvs and (root / "images").is_dir():
        return "csv", csvs
    pkls = {s: root / PICKLE.format(s) for s in SPLITS if (root / PICKLE.format(s)).is_file()}
    if pkls:
        return "pickle", pkls
    raise FewshotError(f"no mini-ImageNet in {root}: expected images/ with train.csv, val.csv and test.csv, or "
                       f"{PICKLE.format('{train,val,test}')}")


def is_mini_imagenet(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a mini-ImageNet pickle or a folder in one of the two layouts."""
    try:
        find_layout(path)
        return True
    except FewshotError:
        return False


def default_root() -> Path:
    """``FEWSHOT_DATA`` (or its ``mini-imagenet``, ``miniimagenet``, ``mini_imagenet`` or ``miniImageNet``
    subfolder)."""
    return env_data_root("mini-ImageNet", ("mini-imagenet", "miniimagenet", "mini_imagenet", "miniImageNet"))


# ------------------------------------------------------------------------------------------ loading
def mini_imagenet(root: str | os.PathLike | None = None, size: int | Sequence[int] = NATIVE_SIZE,
                  channels: int = 3, invert: bool = False,
                  cache: str | os.PathLike | bool | None = None) -> ClassDataset:
    """Load mini-ImageNet from either layout (see the module docstring); group = split name.

    Args:
        root: the data folder or one pickle; defaults to ``$FEWSHOT_DATA`` (see :func:`default_root`).
        size: output size (int or (h, w)); 84 keeps the published pixels.
        channels: 3 (RGB, the default) or 1 (grey).
        invert: store ``255 - value``.
        cache: see :func:`fewshot.data.dataset.cached`; ``False`` disables caching.

    Raises:
        FewshotError: a missing or malformed file, a CSV row naming an image that does not exist (naming the
            CSV, the row and the file), a class listed in two splits, or a pickle that is not mini-ImageNet's.
    """
    root = Path(root) if root is not None else default_root()
    layout, files = find_layout(root)
    if channels not in (1, 3):
        raise FewshotError(f"channels must be 1 or 3, got {channels}")
    pre = Preprocess(size=as_size(size), channels=int(channels), invert=bool(invert))
    params = {"pre": pre.to_dict(), "layout": layout, "splits": sorted(files)}
    if layout == "csv":
        base = next(iter(files.values())).parent
        sources = list(files.values()) + [base / "images"]   # the folder's mtime: images added or removed
        build = lambda: _build_csv(base, files, pre)          # noqa: E731
    else:
        sources = list(files.values())
        build = lambda: _build_pickles(files, pre)            # noqa: E731
    return cached(sources, params, build, tag="mini-imagenet", cache=cache)


def _check_disjoint(splits: Dict[str, Sequence[str]], where: str) -> None:
    seen: Dict[str, str] = {}
    for split, classes in splits.items():
        for c in classes:
            if c in seen:
                raise FewshotError(f"{where}: class {c} is in both the {seen[c]} and the {split} split")
            seen[c] = split


def _build_csv(root: Path, csvs: Dict[str, Path], pre: Preprocess) -> ClassDataset:
    bases = [root / "images", root]
    classes, groups, per_split = [], [], {}
    for split in SPLITS:
        if split not in csvs:
            continue
        entries = resolve_rows(read_sheet(csvs[split], f"mini-ImageNet {split}.csv"), csvs[split], bases)
        by: Dict[str, list] = {}
        for _, p, label in entries:
            by.setdefault(label, []).append(p)
        names = sorted(by, key=natural_key)
        per_split[split] = names
        classes += [(n, by[n]) for n in names]
        groups += [split] * len(names)
    _check_disjoint(per_split, f"mini-ImageNet {root}")
    return decode_classes(classes, pre, groups, source=f"mini-imagenet:{root.name}")


def _read_pickle(path: Path) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """(image_data [N, H, W, 3] uint8, {class id: int64 indices}) of one cache pickle, checked."""
    d = load_pickle(path)
    if isinstance(d, dict):
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if not isinstance(d, dict) or "image_data" not in d or "class_dict" not in d:
        raise FewshotError(f"{path} is not a mini-ImageNet pickle (expected a dict with 'image_data' and "
                           "'class_dict')")
    x, cd = d["image_data"], d["class_dict"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        shape = getattr(x, "shape", type(x).__name__)
        raise FewshotError(f"{path}: 'image_data' must be a uint8 array [N, H, W, 3], got "
                           f"{getattr(x, 'dtype', '')} {shape}")
    if not isinstance(cd, dict) or not cd:
        raise FewshotError(f"{path}: 'class_dict' must map each class id to the indices of its images")
    out = {}
    for k, v in cd.items():
        name = k.decode("utf-8") if isinstance(k, bytes) else str(k)
        try:
            idx = np.asarray(v, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise FewshotError(f"{path}: class {name}'s entry in 'class_dict' is not a list of indices") from None
        if idx.size == 0:
            raise FewshotError(f"{path}: class {name} has no images")
        bad = idx[(idx < 0) | (idx >= len(x))]
        if bad.size:
            raise FewshotError(f"{path}: class {name} has image index {int(bad[0])} outside 'image_data' "
                               f"(0..{len(x) - 1})")
        out[name] = idx
    return x, out


def _convert_array(x: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """uint8 ``[n, H, W, 3]`` -> ``[n, C, h, w]`` following ``pre`` (no per-image work at native settings)."""
    if tuple(x.shape[1:3]) == tuple(pre.size) and pre.channels == 3 and not pre.invert:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    h, w = pre.size
    out = torch.empty(len(x), pre.channels, h, w, dtype=torch.uint8)
    for i, im in enumerate(x):
        out[i] = convert(Image.fromarray(im, "RGB"), pre)
    return out


def _build_pickles(pkls: Dict[str, Path], pre: Preprocess) -> ClassDataset:
    parts, counts, names, groups, per_split = [], [], [], [], {}
    for split in SPLITS:
        if split not in pkls:
            continue
        x, cd = _read_pickle(pkls[split])
        ids = sorted(cd, key=natural_key)
        per_split[split] = ids
        for c in ids:
            parts.append(_convert_array(x[cd[c]], pre))
            counts.append(len(cd[c]))
        names += ids
        groups += [split] * len(ids)
        del x, cd
    _check_disjoint(per_split, "mini-ImageNet pickles in " + str(next(iter(pkls.values())).parent))
    source = next(iter(pkls.values()))
    return ClassDataset(torch.cat(parts), counts, names, groups, pre,
                        source=f"mini-imagenet:{source.parent.name if len(pkls) > 1 else source.name}")


# ------------------------------------------------------------------------------------------ the published split
def has_published_split(ds: ClassDataset) -> bool:
    """Whether ``ds`` carries its own split: every group is a split name and there are train and test
    classes (mini-ImageNet from either layout)."""
    return ds.groups is not None and {"train", "test"} <= set(ds.groups) <= set(SPLITS)


def published_split(ds: ClassDataset) -> Tuple[ClassDataset, Optional[ClassDataset], ClassDataset]:
    """(train, val, test) classes by the split the data came with (``val`` is None when the data has no
    validation classes).

    Raises:
        FewshotError: ``ds`` has no published split (``--split published`` on other data).
    """
    if not has_published_split(ds):
        raise FewshotError(f"--split published needs data that comes with its train/val/test split "
                           f"(mini-ImageNet's CSVs or pickles); {ds.source or 'this data set'} has none")
    if "val" in ds.groups:
        return ds.split_by_group(test=["test"], val=["val"])
    train, test = ds.split_by_group(test=["test"])
    return train, None, test
