"""Data: :class:`ClassDataset` and its loaders (Omniglot, CIFAR-100, mini-ImageNet, tiered-ImageNet,
CUB-200-2011, image folders, labelled flat folders, audio clips, glyphs, Lake's one-shot runs).

``load(spec, ...)`` resolves what a user passes as ``--data``: the name of a built-in set ("glyphs"),
"omniglot", "cifar100", "mini-imagenet", "tiered-imagenet" or "cub" (found through ``$FEWSHOT_DATA``), or a
path (Omniglot zips or folders, the CIFAR-100 python archive or folder, mini-ImageNet's CSV or pickle layout,
tiered-ImageNet's ``.npz``/``.pkl`` folder, CUB-200-2011's folder or ``.tgz``, an image folder with
one subfolder per class, or a folder of audio clips with one subfolder per class). ``mmap`` (``--mmap``)
says when the decoded images are memory-mapped instead of loaded (:func:`fewshot.data.dataset.cached`). With ``labels`` (a
``path,label`` CSV) or ``label_pattern`` (a regular expression on file names) the folder's images are
labelled by that instead (:mod:`fewshot.data.labeled`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import FewshotError
from .audio import AudioFeatures, audio_folder, is_audio_folder, list_clips, load_clips
from .cifar import cifar100, is_cifar100
from .cifar import default_root as cifar_root
from .cub import cub, is_cub
from .cub import default_root as cub_root
from .dataset import ClassDataset, cached, memory_mapping
from .folder import image_folder, list_images, load_files
from .glyphs import glyphs
from .images import Preprocess, load_image
from .labeled import labeled_folder
from .lake import LakeRun, load_lake_runs
from .miniimagenet import has_published_split, is_mini_imagenet, mini_imagenet, published_split
from .miniimagenet import default_root as mini_imagenet_root
from .omniglot import FILES as OMNIGLOT_FILES, default_root, download_file, omniglot
from .tiered import is_tiered_imagenet, tiered_imagenet
from .tiered import default_root as tiered_root

__all__ = ["ClassDataset", "Preprocess", "cached", "glyphs", "image_folder", "list_images", "load",
           "load_files", "load_image", "load_lake_runs", "LakeRun", "omniglot", "download_file", "kind_of",
           "cifar100", "audio_folder", "AudioFeatures", "load_support", "list_queries", "load_queries",
           "mini_imagenet", "labeled_folder", "published_split", "has_published_split", "tiered_imagenet", "cub",
           "memory_mapping"]

BUILTIN = ("glyphs", "omniglot", "cifar100", "mini-imagenet", "tiered-imagenet", "cub")


def _is_omniglot_dir(p: Path) -> bool:
    names = {n for n in OMNIGLOT_FILES if n != "all_runs"}
    if p.name in names:
        return True
    if any((p / n).is_dir() or (p / (n + ".zip")).is_file() for n in names):
        return True
    return False


def kind_of(spec: str) -> str:
    """"glyphs", "omniglot", "cifar100", "mini-imagenet", "tiered-imagenet", "cub", "audio" or "folder" for a
    ``--data`` value."""
    if spec in BUILTIN:
        return spec
    p = Path(spec)
    if not p.exists():
        raise FewshotError(f"no such data set or path: {spec} (built-in: {', '.join(BUILTIN)})")
    if p.is_file():
        if p.suffix == ".zip":
            return "omniglot"
        if is_cifar100(p):
            return "cifar100"
        if is_mini_imagenet(p):
            return "mini-imagenet"
        if is_cub(p):
            return "cub"
        raise FewshotError(f"{spec} is a file; --data takes a folder, an Omniglot zip, the CIFAR-100 archive, "
                           "a mini-ImageNet pickle, the CUB-200-2011 archive or a built-in name")
    if _is_omniglot_dir(p):
        return "omniglot"
    if is_cifar100(p):
        return "cifar100"
    if is_mini_imagenet(p):
        return "mini-imagenet"
    if is_tiered_imagenet(p):
        return "tiered-imagenet"
    if is_cub(p):
        return "cub"
    return "audio" if is_audio_folder(p) else "folder"


def _labeled(spec: str, labels, label_pattern, size, channels: int, invert: bool, cache) -> ClassDataset:
    """A folder labelled by a sheet or a file-name pattern; the names of built-in sets are not folders."""
    if spec not in BUILTIN and not Path(spec).exists():
        raise FewshotError(f"no such data folder: {spec}")
    if spec in BUILTIN or not Path(spec).is_dir():
        flag = "--labels" if labels is not None else "--label-pattern"
        raise FewshotError(f"{flag} labels the images of a folder; --data {spec} is not one")
    return labeled_folder(spec, labels=labels, pattern=label_pattern, size=size, channels=channels,
                          invert=invert, cache=cache)


def load(spec: str, size=28, channels: Optional[int] = None, invert: Optional[bool] = None,
         cache=None, labels: Optional[str] = None, label_pattern: Optional[str] = None,
         mmap="auto") -> ClassDataset:
    """Load the data set named or located by ``spec`` (see the module docstring), memory-mapped as ``mmap``
    (``"auto"``, ``True`` or ``False``) says: see :func:`fewshot.data.dataset.cached`.

    ``channels`` and ``invert`` apply to image folders (defaults: 1 channel, no inversion) and mini-ImageNet
    (default: RGB); Omniglot and glyphs are grey with bright strokes by construction. ``labels`` (a CSV of
    ``path,label`` rows) or ``label_pattern`` (a regular expression whose first group is the class) label
    the images of the folder ``spec`` instead of its subfolders.
    """
    with memory_mapping(mmap):
        return _load(spec, size, channels, invert, cache, labels, label_pattern)


def _load(spec, size, channels, invert, cache, labels, label_pattern) -> ClassDataset:
    if labels is not None or label_pattern is not None:
        return _labeled(spec, labels, label_pattern, size, channels or 1, bool(invert), cache)
    kind = kind_of(spec)
    if kind == "glyphs":
        return glyphs(size=size, cache=cache)
    if kind == "omniglot":
        root = default_root() if spec == "omniglot" else Path(spec)
        return omniglot(root, size=size, cache=cache)
    if kind == "cifar100":
        return cifar100(cifar_root() if spec == "cifar100" else Path(spec), size=size, cache=cache)
    if kind == "mini-imagenet":
        return mini_imagenet(mini_imagenet_root() if spec == "mini-imagenet" else Path(spec), size=size,
                             channels=channels or 3, invert=bool(invert), cache=cache)
    if kind == "tiered-imagenet":
        return tiered_imagenet(tiered_root() if spec == "tiered-imagenet" else Path(spec), size=size,
                               channels=channels or 3, invert=bool(invert), cache=cache)
    if kind == "cub":
        return cub(cub_root() if spec == "cub" else Path(spec), size=size, cache=cache)
    if kind == "audio":
        return audio_folder(spec, cache=cache)
    return image_folder(spec, size=size, channels=channels or 1, invert=bool(invert), cache=cache)


def load_like(spec: str, preprocess: Preprocess, cache=None, labels: Optional[str] = None,
              label_pattern: Optional[str] = None, mmap="auto") -> ClassDataset:
    """Load ``spec`` with the preprocessing a run was trained with (size, channels, inversion; MFCC
    settings for audio), labelled by ``labels`` / ``label_pattern`` when given, memory-mapped as ``mmap``
    says (see :func:`load`)."""
    with memory_mapping(mmap):
        return _load_like(spec, preprocess, cache, labels, label_pattern)


def _load_like(spec, preprocess, cache, labels, label_pattern) -> ClassDataset:
    if labels is not None or label_pattern is not None:
        if preprocess.audio is not None:
            raise FewshotError("--labels/--label-pattern label images, but the run was trained on audio clips")
        return _labeled(spec, labels, label_pattern, preprocess.size, preprocess.channels, preprocess.invert,
                        cache)
    kind = kind_of(spec)
    if preprocess.audio is not None or kind == "audio":
        if preprocess.audio is None or kind != "audio":
            raise FewshotError(f"{spec} is {'a folder of audio clips' if kind == 'audio' else 'not audio'} but "
                               f"the run was trained on {'images' if preprocess.audio is None else 'audio clips'}")
        return audio_folder(spec, features=preprocess.audio, cache=cache)
    if kind in ("glyphs", "omniglot", "cifar100", "cub"):
        ds = _load(spec, preprocess.size, None, None, cache, None, None)
        if ds.preprocess.channels != preprocess.channels:
            raise FewshotError(f"{spec} has {ds.preprocess.channels} channel(s) but the run was trained on "
                               f"{preprocess.channels}")
        return ds
    if kind in ("mini-imagenet", "tiered-imagenet"):
        return _load(spec, preprocess.size, preprocess.channels, preprocess.invert, cache, None, None)
    return image_folder(spec, size=preprocess.size, channels=preprocess.channels, invert=preprocess.invert,
                        cache=cache)


def load_support(path: str, preprocess: Preprocess) -> ClassDataset:
    """A support folder (one subfolder of a few examples per class) processed like a run's training data."""
    if preprocess.audio is not None:
        return audio_folder(path, features=preprocess.audio, cache=False)
    return image_folder(path, size=preprocess.size, channels=preprocess.channels, invert=preprocess.invert,
                        cache=False)


def list_queries(path: str, preprocess: Preprocess) -> list:
    """The query files for ``path`` (a file, or the clips/images directly in a folder)."""
    return list_clips(path) if preprocess.audio is not None else list_images(path)


def load_queries(paths, preprocess: Preprocess):
    """Query files -> one tensor processed like a run's training data (uint8 images or float32 MFCC maps)."""
    if preprocess.audio is not None:
        return load_clips(paths, AudioFeatures.from_dict(preprocess.audio))
    return load_files(paths, preprocess)


def data_root_env() -> Optional[str]:
    return os.environ.get("FEWSHOT_DATA")
