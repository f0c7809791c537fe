"""Task families beyond image classes: sine regression and toy binary classification.

A task family is a sampler with the :class:`fewshot.episodes.EpisodeSampler` interface (``sample``,
``state_dict``/``load_state_dict``, ``generator``, ``seed``, ``device``, ``ways``/``shots``/``queries``),
so the trainer, the evaluator and the CLI use it as they use image episodes: ``--data sine`` or
``--data toy-binary``. ``regression`` tells the evaluator to report the mean squared error; a family with its
own per-task metric sets ``metric`` (e.g. ``"bits"``, lower is better) and ``score(prediction, episode)``.
Families with a ``from_spec`` class method accept options after a colon: ``copy:40``, ``copy:1-20``,
``bandit:k=5,n=100``; ``navigation2d`` and ``bandit`` are reinforcement-learning families (:mod:`.rl`),
``reach`` and ``strokes[:PATH]`` meta-imitation families (:mod:`.imitation`). A family that scores a method itself (closed-loop
control) has ``evaluate_episode(method, episode) -> [B]``, which the evaluator calls instead of ``predict``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import FewshotError
from .base import TaskFamily
from .copy import CopyTasks
from .imitation import ImitationTasks, StrokeTasks
from .rl import RLTasks
from .sine import SineTasks
from .toy import BinaryTasks

FAMILIES = {"sine": SineTasks, "toy-binary": BinaryTasks, "copy": CopyTasks, "bandit": RLTasks,
            "navigation2d": RLTasks, "reach": ImitationTasks, "strokes": StrokeTasks}

__all__ = ["FAMILIES", "BinaryTasks", "CopyTasks", "ImitationTasks", "RLTasks", "SineTasks", "StrokeTasks", "TaskFamily", "family_name", "family_tag", "is_family", "make"]


def family_name(name: str) -> str:
    """The family of a data name: ``"copy:40"`` -> ``"copy"`` (families with ``from_spec`` take options)."""
    base = str(name).partition(":")[0]
    return base if base in FAMILIES and hasattr(FAMILIES[base], "from_spec") else str(name)


def family_tag(name: str) -> str:
    """A file-name-safe tag of a family spec (``bandit:k=5,n=100`` -> ``bandit-k=5,n=100``; a path in the
    spec, as in ``strokes:/data/omniglot``, becomes its last component)."""
    base, _, rest = str(name).partition(":")
    parts = [Path(p).name if ("/" in p or os.sep in p) else p for p in rest.split(",") if p]
    return re.sub(r"[^A-Za-z0-9._=+,-]", "_", "-".join([base, ",".join(parts)]) if parts else base)


def is_family(name: str) -> bool:
    return family_name(name) in FAMILIES


def make(name: str, shots: int, queries: int, batch: int = 1, device="cpu", seed: int = 0,
         ways: int | None = None, split: str = "train") -> TaskFamily:
    """A sampler of the task family ``name`` (see :data:`FAMILIES`); ``split`` ("train", "val", "test")
    picks the part of the data a family drawn from data (:attr:`TaskFamily.data_split`) takes its tasks from."""
    base = family_name(name)
    if base not in FAMILIES:
        raise FewshotError(f"unknown task family {name!r}; choose from {', '.join(FAMILIES)}")
    kw = dict(shots=shots, queries=queries, batch=batch, device=device, seed=seed, ways=ways)
    cls = FAMILIES[base]
    if cls.data_split:
        kw["split"] = split
    return cls.from_spec(name, **kw) if hasattr(cls, "from_spec") else cls(**kw)
