"""The image size and channel count a data set has of its own, for ``size: auto`` (and ``channels``
left unset with ``size: auto``).

- Omniglot and glyphs: 28x28 grey, the size their published few-shot protocol (and this project's measured
  defaults) use, not the 105x105 of the files.
- CIFAR-100: 32x32 RGB; mini-ImageNet, tiered-ImageNet and CUB: 84x84 RGB (their releases' size).
- An image folder (class subfolders, or a flat folder labelled by ``--labels`` / ``--label-pattern``): the
  median height and width of up to :data:`SAMPLE` of its images (read from the file headers, evenly spread
  over the sorted files), shrunk to a longer side of at most :data:`AUTO_MAX` keeping the aspect ratio, and
  RGB when most of those images are stored in colour, else grey.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from PIL import Image

from .images import is_image_file

#: the longest side ``size: auto`` gives an image folder (the common few-shot input size, e.g. mini-ImageNet)
AUTO_MAX = 84
#: how many images of a folder are read (headers only) to find its size and colour
SAMPLE = 64
#: the settings of the built-in sets: (height, width), channels
NAMED = {"omniglot": ((28, 28), 1), "glyphs": ((28, 28), 1), "cifar100": ((32, 32), 3),
         "mini-imagenet": ((84, 84), 3), "tiered-imagenet": ((84, 84), 3), "cub": ((84, 84), 3)}
_COLOUR_MODES = {"RGB", "RGBA", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"}


def _image_files(root: Path) -> list:
    """The visible image files under ``root`` (any depth), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and is_image_file(f))
    return out


def capped(h: int, w: int, most: int = AUTO_MAX) -> tuple:
    """``(h, w)`` shrunk so that its longer side is at most ``most``, keeping the aspect ratio (at least 1)."""
    scale = min(1.0, most / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def folder_settings(root: str | os.PathLike) -> Optional[tuple]:
    """``((height, width), channels)`` of the images of the folder ``root`` (see the module docstring);
    ``None`` when none of the sampled files can be read (the loader then reports the culprit)."""
    files = _image_files(Path(root))
    step = max(1, len(files) // SAMPLE)
    sizes, colour = [], 0
    for f in files[::step][:SAMPLE]:
        try:
            with Image.open(f) as im:
                w, h = im.size
                colour += im.mode in _COLOUR_MODES
        except (OSError, ValueError, Image.DecompressionBombError):
            continue                # unreadable: left for the loader to name
        sizes.append((h, w))
    if not sizes:
        return None
    hs, ws = sorted(s[0] for s in sizes), sorted(s[1] for s in sizes)
    mid = len(sizes) // 2
    return capped(hs[mid], ws[mid]), 3 if colour * 2 > len(sizes) else 1


def native_settings(kind: str, spec: str) -> Optional[tuple]:
    """``((height, width), channels)`` for data of ``kind`` (:func:`fewshot.data.kind_of`) at ``spec``;
    ``None`` for audio clips (their feature maps have their own size) and folders without a readable image."""
    if kind in NAMED:
        return NAMED[kind]
    if kind == "audio":
        return None
    return folder_settings(spec)
