"""Checkpoints: written atomically and durably (:func:`fewshot.rundir.atomic_write`: temporary file fsynced,
renamed, folder fsynced), read with ``torch.load(weights_only=True)`` (a checkpoint is untrusted)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import rundir
from .errors import FewshotError

FORMAT = "fewshot-checkpoint/1"


def save(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a temporary file ``.NAME.tmpPID``, fsynced before the rename over ``path``
    (and the folder after it), so a stop at any moment leaves the old or the new checkpoint, never a part."""
    data = {"format": FORMAT, **obj}
    rundir.atomic_write(path, lambda tmp: torch.save(data, tmp))


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
