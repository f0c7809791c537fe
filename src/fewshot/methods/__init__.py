"""Method registry: ``build(name, in_shape, **options)`` makes any registered method."""
from __future__ import annotations

from dataclasses import fields
from typing import Sequence

from ..errors import FewshotError
from .base import Method

_REGISTRY: dict = {}


def register(name: str):
    """Class decorator adding a :class:`Method` subclass to the registry under ``name``."""
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def available() -> list:
    return sorted(_REGISTRY)


def get(name: str) -> type:
    if name not in _REGISTRY:
        raise FewshotError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def make_config(name: str, options: dict | None = None):
    """The method's Config dataclass filled from ``options``; unknown keys are an error."""
    cls = get(name)
    options = dict(options or {})
    known = {f.name for f in fields(cls.Config)}
    bad = sorted(set(options) - known)
    if bad:
        raise FewshotError(f"method {name!r} has no option {bad[0]!r}; options: {', '.join(sorted(known))}")
    return cls.Config(**options)


def build(name: str, in_shape: Sequence[int], **options) -> Method:
    """Build a registered method for inputs of shape ``in_shape`` (C, H, W) or (D,)."""
    cls = get(name)
    return cls(make_config(name, options), in_shape)


def describe(name: str) -> str:
    doc = (get(name).__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


from . import (contextual, gaussian, gbml, hallucinate, mann, matching, metalstm, ntm,  # noqa: E402,F401
               protonet, relation, semisup, siamese, taskcond)  # (registers methods)
