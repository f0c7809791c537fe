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


def scan_files(folder: Path, accept=is_image_file) -> list[tuple[Path, int, int]]:
    """Visible files directly in ``folder`` whose name ``accept`` takes (default: image files), sorted by
    name, as ``(path, size, mtime_ns)``."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if not _visible(e.name) or not accept(e.name):
                    continue
                try:
                    if not e.is_file():
                        continue
                    st = e.stat()
                except OSError:
                    continue  # a dangling link: not a file we can read
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


def class_files(root: Path, accept=is_image_file, what: str = "images") -> list[tuple[str, list]]:
    """``[(class, [(path, size, mtime_ns)])]`` of a class-per-subfolder data set: each visible subfolder of
    ``root`` (sorted) with its files that ``accept`` takes.

    Raises:
        FewshotError: ``root`` has no class subfolders (saying so when such files lie loose in it) or a class
            folder has none of them (``what`` names them in the message).
    """
    folders = _class_folders(root)
    if not folders:
        loose = len(scan_files(root, accept))
        hint = f" ({loose} {what} lie directly in it; move each class into its own subfolder)" if loose else ""
        raise FewshotError(f"no class subfolders in {root}{hint}")
    classes = []
    for d in folders:
        files = scan_files(d, accept)
        if not files:
            raise FewshotError(f"class folder {d} has no {what}")
        classes.append((d.name, files))
    return classes


def files_digest(classes: Sequence[tuple[str, list[tuple[Path, int, int]]]], root: Path | None = None) -> str:
    """A digest of every (class, path, size, mtime) so that any relabelled, added, removed or changed file
    invalidates a cache (folder mtimes alone miss edits inside class folders). Paths are taken relative to
    ``root`` when given (a folder that moves keeps its cache), else absolute."""
    h = hashlib.sha256()
    for name, files in classes:
        for path, size, mtime in files:
            where = path.relative_to(root).as_posix() if root is not None else path.resolve().as_posix()
            h.update(f"{name}\0{where}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def cached_files(root: Path, sources: Sequence[Path], params: dict, build, tag: str, cache) -> ClassDataset:
    """:func:`fewshot.data.dataset.cached` for a data set read from files under ``root``, with the cache
    folder inside ``root`` created first (``root``'s mtime is part of the key: creating the folder after the
    key was computed would change it and miss the cache on the next run)."""
    if cache in (None, True):
        try:
            (root / CACHE_SUBDIR).mkdir(exist_ok=True)
        except OSError:
            pass  # read-only data: cached() falls back to the user cache folder
    return cached(list(sources), params, build, tag=tag, cache=cache)


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

    classes = class_files(root)

    def build() -> ClassDataset:
        images = [load_files([p for p, _, _ in files], pre) for _, files in classes]
        return ClassDataset.from_class_tensors(images, [n for n, _ in classes], None, pre,
                                               source=f"image folder {root}")

    params = {"pre": pre.to_dict(), "files": files_digest(classes, root)}
    return cached_files(root, [root], params, build, "folder", cache)


def list_files(path: str | os.PathLike, accept, what: str) -> list[Path]:
    """The files to use for ``path``: a folder -> its visible files that ``accept`` takes (sorted, not
    recursive); a single file -> ``[file]``. ``what`` names them in the error for a folder without any."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FewshotError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise FewshotError(f"not a file or folder: {path}")
    files = [p for p, _, _ in scan_files(path, accept)]
    if not files:
        raise FewshotError(f"no {what} in folder {path}")
    return files


def list_images(path: str | os.PathLike) -> list[Path]:
    """The image files to use for ``path`` (:func:`list_files` of image files)."""
    return list_files(path, is_image_file, "images")


def load_files(paths: Sequence[str | os.PathLike], preprocess: Preprocess) -> torch.Tensor:
    """Decode image files into one uint8 tensor ``[n, C, H, W]`` following ``preprocess``.

    An unreadable file raises :class:`FewshotError` naming it.
    """
    if not paths:
        h, w = preprocess.size
        return torch.zeros(0, preprocess.channels, h, w, dtype=torch.uint8)
    return torch.stack([load_image(p, preprocess) for p in paths])
