"""Data: :class:`ClassDataset` and its loaders (Omniglot, image folders, glyphs, Lake's one-shot runs).

``load(spec, ...)`` resolves what a user passes as ``--data``: the name of a built-in set ("glyphs"),
"omniglot" (found through ``$FEWSHOT_DATA``), or a path (Omniglot zips or folders, or an image folder
with one subfolder per class).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import FewshotError
from .dataset import ClassDataset, cached
from .folder import image_folder, list_images, load_files
from .glyphs import glyphs
from .images import Preprocess, as_size, load_image
from .lake import LakeRun, load_lake_runs
from .omniglot import FILES as OMNIGLOT_FILES, default_root, download_file, omniglot

__all__ = ["ClassDataset", "Preprocess", "cached", "glyphs", "image_folder", "list_images", "load",
           "load_files", "load_image", "load_lake_runs", "LakeRun", "omniglot", "download_file", "kind_of"]

BUILTIN = ("glyphs", "omniglot")


def _is_omniglot_dir(p: Path) -> bool:
    names = {n for n in OMNIGLOT_FILES if n != "all_runs"}
    if p.name in names:
        return True
    if any((p / n).is_dir() or (p / (n + ".zip")).is_file() for n in names):
        return True
    return False


def kind_of(spec: str) -> str:
    """"glyphs", "omniglot" or "folder" for a ``--data`` value."""
    if spec in BUILTIN:
        return spec
    p = Path(spec)
    if not p.exists():
        raise FewshotError(f"no such data set or path: {spec} (built-in: {', '.join(BUILTIN)})")
    if p.is_file():
        if p.suffix == ".zip":
            return "omniglot"
        raise FewshotError(f"{spec} is a file; --data takes a folder, an Omniglot zip or a built-in name")
    return "omniglot" if _is_omniglot_dir(p) else "folder"


def load(spec: str, size=28, channels: Optional[int] = None, invert: Optional[bool] = None,
         cache=None) -> ClassDataset:
    """Load the data set named or located by ``spec`` (see the module docstring).

    ``channels`` and ``invert`` apply to image folders (defaults: 1 channel, no inversion); Omniglot and
    glyphs are grey with bright strokes by construction.
    """
    kind = kind_of(spec)
    if kind == "glyphs":
        return glyphs(size=size, cache=cache)
    if kind == "omniglot":
        root = default_root() if spec == "omniglot" else Path(spec)
        return omniglot(root, size=size, cache=cache)
    return image_folder(spec, size=size, channels=channels or 1, invert=bool(invert), cache=cache)


def load_like(spec: str, preprocess: Preprocess, cache=None) -> ClassDataset:
    """Load ``spec`` with the preprocessing a run was trained with (size, channels, inversion)."""
    kind = kind_of(spec)
    if kind in ("glyphs", "omniglot"):
        ds = load(spec, size=preprocess.size, cache=cache)
        if ds.preprocess.channels != preprocess.channels:
            raise FewshotError(f"{spec} has {ds.preprocess.channels} channel(s) but the run was trained on "
                               f"{preprocess.channels}")
        return ds
    return image_folder(spec, size=preprocess.size, channels=preprocess.channels, invert=preprocess.invert,
                        cache=cache)


def data_root_env() -> Optional[str]:
    return os.environ.get("FEWSHOT_DATA")
