"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (a checkpoint is untrusted)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import FewshotError

FORMAT = "fewshot-checkpoint/1"


def save(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, **obj}, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint safely; anything that is not a fewshot checkpoint is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FewshotError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # an untrusted file can fail anywhere in the unpickler (IndexError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise FewshotError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FewshotError(f"{path} is not a fewshot checkpoint")
    return obj
