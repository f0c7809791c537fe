"""Task families beyond image classes: sine regression and toy binary classification.

A task family is a sampler with the :class:`fewshot.episodes.EpisodeSampler` interface (``sample``,
``state_dict``/``load_state_dict``, ``generator``, ``seed``, ``device``, ``ways``/``shots``/``queries``),
so the trainer, the evaluator and the CLI use it as they use image episodes: ``--data sine`` or
``--data toy-binary``. ``regression`` tells the evaluator to report the mean squared error.
"""
from __future__ import annotations

from ..errors import FewshotError
from .base import TaskFamily
from .sine import SineTasks
from .toy import BinaryTasks

FAMILIES = {"sine": SineTasks, "toy-binary": BinaryTasks}

__all__ = ["FAMILIES", "BinaryTasks", "SineTasks", "TaskFamily", "is_family", "make"]


def is_family(name: str) -> bool:
    return name in FAMILIES


def make(name: str, shots: int, queries: int, batch: int = 1, device="cpu", seed: int = 0,
         ways: int | None = None) -> TaskFamily:
    """A sampler of the task family ``name`` (see :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise FewshotError(f"unknown task family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name](shots=shots, queries=queries, batch=batch, device=device, seed=seed, ways=ways)
