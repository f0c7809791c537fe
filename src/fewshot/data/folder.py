"""Class-per-subfolder image data sets, and loose image files for prediction.

``image_folder(root)`` reads ``root/<class>/<image>`` (PNG, JPEG, PGM, BMP, ... grey or colour): the class
name is the subfolder name, classes are sorted by name, images within a class by file name. Names starting
with ``.`` are ignored (this also skips the ``.fewshot-cache`` folder the decoded tensors are cached in).

``list_images`` and ``load_files`` turn a query file or folder into a tensor with the same preprocessing a
model was trained with (``predict`` uses them).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import FewshotError
from .dataset import ClassDataset, cached
from .images import Preprocess, as_size, is_image_file, load_image

CACHE_SUBDIR = ".fewshot-cache"


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _scan_images(folder: Path) -> list[tuple[Path, int, int]]:
    """Visible image files directly in ``folder``, sorted by name, as ``(path, size, mtime_ns)``."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if not _visible(e.name) or not is_image_file(e.name):
                    continue
                try:
                    if not e.is_file():
                        continue
                    st = e.stat()
                except OSError:
                    continue  # a dangling link: not an image we can read
                out.append((Path(e.path), st.st_size, st.st_mtime_ns))
    except PermissionError:
        raise FewshotError(f"cannot list folder {folder}: permission denied") from None
    out.sort(key=lambda t: t[0].name)
    return out


def _class_folders(root: Path) -> list[Path]:
    """Visible subfolders of ``root``, sorted by name."""
    try:
        subs = [p for p in root.iterdir() if _visible(p.name) and p.is_dir()]
    except PermissionError:
        raise FewshotError(f"cannot list folder {root}: permission denied") from None
    return sorted(subs, key=lambda p: p.name)


def _files_digest(root: Path, classes: Sequence[tuple[str, list[tuple[Path, int, int]]]]) -> str:
    """A digest of every (relative path, size, mtime) so that any added, removed or changed file
    invalidates the cache (folder mtimes alone miss edits inside class folders)."""
    h = hashlib.sha256()
    for name, files in classes:
        for path, size, mtime in files:
            h.update(f"{path.relative_to(root).as_posix()}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def image_folder(root: str | os.PathLike, size: int | Sequence[int] = 28, channels: int = 1,
                 invert: bool = False, cache: str | os.PathLike | bool | None = None) -> ClassDataset:
    """Load ``root/<class>/<image files>`` into a :class:`ClassDataset`.

    Args:
        root: folder with one subfolder per class.
        size: side (int) or (height, width) the images are resized to.
        channels: 1 (grey) or 3 (RGB).
        invert: store ``255 - value`` (use for dark strokes on a light background).
        cache: see :func:`fewshot.data.dataset.cached`; ``False`` disables caching.

    Raises:
        FewshotError: the root is missing or not a folder, it has no class subfolders, a class folder has
            no images, or an image cannot be decoded (each message names the path).
    """
    root = Path(root)
    if not root.exists():
        raise FewshotError(f"no such folder: {root}")
    if not root.is_dir():
        raise FewshotError(f"not a folder: {root} (expected one subfolder of images per class)")
    if channels not in (1, 3):
        raise FewshotError(f"channels must be 1 or 3, got {channels}")
    pre = Preprocess(size=as_size(size), channels=int(channels), invert=bool(invert))

    folders = _class_folders(root)
    if not folders:
        loose = len(_scan_images(root))
        hint = f" ({loose} images lie directly in it; move each class into its own subfolder)" if loose else ""
        raise FewshotError(f"no class subfolders in {root}{hint}")
    classes = []
    for d in folders:
        files = _scan_images(d)
        if not files:
            raise FewshotError(f"class folder {d} has no images")
        classes.append((d.name, files))

    def build() -> ClassDataset:
        images = [load_files([p for p, _, _ in files], pre) for _, files in classes]
        return ClassDataset.from_class_tensors(images, [n for n, _ in classes], None, pre,
                                               source=f"image folder {root}")

    if cache in (None, True):
        # The cache key includes the root folder's mtime; creating the cache folder inside root after the
        # key was computed would change it and miss the cache on the next run, so create it first.
        try:
            (root / CACHE_SUBDIR).mkdir(exist_ok=True)
        except OSError:
            pass  # read-only data: cached() falls back to the user cache folder
    params = {"pre": pre.to_dict(), "files": _files_digest(root, classes)}
    return cached([root], params, build, tag="folder", cache=cache)


def list_images(path: str | os.PathLike) -> list[Path]:
    """The image files to use for ``path``: a folder -> its visible image files (sorted, not recursive);
    a single file -> ``[file]``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FewshotError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise FewshotError(f"not a file or folder: {path}")
    files = [p for p, _, _ in _scan_images(path)]
    if not files:
        raise FewshotError(f"no images in folder {path}")
    return files


def load_files(paths: Sequence[str | os.PathLike], preprocess: Preprocess) -> torch.Tensor:
    """Decode image files into one uint8 tensor ``[n, C, H, W]`` following ``preprocess``.

    An unreadable file raises :class:`FewshotError` naming it.
    """
    if not paths:
        h, w = preprocess.size
        return torch.zeros(0, preprocess.channels, h, w, dtype=torch.uint8)
    return torch.stack([load_image(p, preprocess) for p in paths])
