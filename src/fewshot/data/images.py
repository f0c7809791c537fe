"""Image decoding and preprocessing with Pillow (no torchvision).

A :class:`Preprocess` records everything needed to turn a raw file into the tensor a model saw in
training (size, channels, inversion). It is stored in every run, so ``predict`` and ``eval`` on new
folders apply exactly the same steps.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import FewshotError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Preprocess:
    """How raw images become uint8 tensors ``[C, H, W]``.

    size: (height, width) after resizing. channels: 1 (grey) or 3 (RGB). invert: store ``255 - value``
    (Omniglot and glyphs: black strokes on white become strokes = 1 after scaling to [0, 1]).
    audio: for audio clips, the MFCC settings (:class:`fewshot.data.audio.AudioFeatures` as a dict); then
    size is (n_mfcc, frames) of the float32 feature maps. None for images (and omitted from ``to_dict``).
    """

    size: tuple = (28, 28)
    channels: int = 1
    invert: bool = False
    audio: Optional[dict] = field(default=None, hash=False, compare=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        if self.audio is None:
            del d["audio"]
        return d

    @staticmethod
    def from_dict(d: dict) -> "Preprocess":
        """The inverse of :meth:`to_dict`; a malformed record (as in a damaged checkpoint) is a
        :class:`FewshotError` naming the entry. Task families record size (0, 0) and 0 channels."""
        if not isinstance(d, dict):
            raise FewshotError(f"malformed preprocess record {d!r}: expected a mapping")
        size, channels, invert = d.get("size"), d.get("channels"), d.get("invert", False)
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in size)):
            raise FewshotError(f"malformed preprocess.size {size!r}: expected [height, width]")
        if isinstance(channels, bool) or channels not in (0, 1, 3):
            raise FewshotError(f"malformed preprocess.channels {channels!r}: expected 1 or 3")
        if (channels == 0) != (tuple(size) == (0, 0)):      # only a task family's record has no pixels
            raise FewshotError(f"malformed preprocess.size {size!r} for {channels} channel(s)")
        if not isinstance(invert, bool):
            raise FewshotError(f"malformed preprocess.invert {invert!r}: expected true or false")
        audio = d.get("audio")
        if audio is not None and not isinstance(audio, dict):
            raise FewshotError(f"malformed preprocess.audio {audio!r}: expected a mapping")
        return Preprocess(size=tuple(size), channels=channels, invert=invert, audio=dict(audio) if audio else None)


def as_size(size) -> tuple:
    """28 -> (28, 28); (h, w) stays."""
    if isinstance(size, int):
        return (size, size)
    s = tuple(int(v) for v in size)
    if len(s) != 2 or min(s) < 1:
        raise FewshotError(f"image size must be an int or (height, width), got {size!r}")
    return s


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey images (PNG, TIFF: Pillow's modes ``I;16*``, or ``I`` holding values up to 65535) scaled
    to 8-bit grey, ``round(v * 255 / 65535)``; Pillow's own ``convert("L")`` clips every value above 255
    instead, which leaves about two grey levels. Other images are returned as they are."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    a = np.asarray(img).astype(np.int64)
    if img.mode == "I" and (a.size == 0 or a.min() < 0 or a.max() > 65535 or a.max() <= 255):
        return img      # 32-bit data that is not 16-bit grey: Pillow's conversion is as good as any
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))


def convert(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """A PIL image -> uint8 tensor [C, H, W] following ``pre`` (16-bit grey is scaled, see :func:`to_8bit`)."""
    img = to_8bit(img)
    mode = "L" if pre.channels == 1 else "RGB"
    if img.mode in ("P", "LA", "RGBA", "PA") and mode == "L":
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert(mode)
    h, w = pre.size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    a = np.array(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[None]
    else:
        a = a.transpose(2, 0, 1)
    if pre.invert:
        a = 255 - a
    return torch.from_numpy(np.ascontiguousarray(a))


def load_image(source: Union[str, os.PathLike, bytes], pre: Preprocess, name: str | None = None) -> torch.Tensor:
    """Decode a file path or raw bytes into a uint8 tensor [C, H, W]; unreadable input names the file."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        img.load()
    except FileNotFoundError:
        raise FewshotError(f"image not found: {label}") from None
    except Image.DecompressionBombError as e:
        raise FewshotError(f"refusing image {label}: over Pillow's decompression-bomb limit ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FewshotError(f"cannot read image {label}: {e.__class__.__name__}: {e}") from None
    return convert(img, pre)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_float(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> floats in [0, 1]; float data (features such as MFCCs) is only cast to ``dtype``."""
    if x.is_floating_point():
        return x.to(dtype)
    return x.to(dtype).div_(255.0)
