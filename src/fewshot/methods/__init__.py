"""Method registry: ``build(name, in_shape, **options)`` makes any registered method."""
from __future__ import annotations

from dataclasses import fields
import importlib
import pkgutil
from typing import Any, Sequence

from ..errors import FewshotError
from .base import Method, building

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


def build(name: str, in_shape: Sequence[int], backbone: Any = None, load_pretrained: bool = True,
          **options) -> Method:
    """Build a registered method for inputs of shape ``in_shape`` (C, H, W) or (D,).

    ``backbone``: the network of a method that has one (its ``backbone`` option): a name or spec string
    (as ``--backbone``), an ``nn.Module`` (used as it is, not copied; a gradient-based method's module is
    the whole network, head included) or a callable returning one (called with whichever of ``in_shape``
    and ``outputs`` it accepts). A module or callable cannot live in a config: the config records
    ``package.module:qualname`` for an importable callable and ``instance of package.module.Class`` for a
    module, and a run trained with a module is reloaded with ``fewshot.load_run(path, backbone=module)``.
    ``load_pretrained=False`` skips the ``pretrained`` file (a checkpoint's weights follow)."""
    cls = get(name)
    given = None
    if backbone is not None:
        if "backbone" not in {f.name for f in fields(cls.Config)}:
            raise FewshotError(f"method {name!r} builds its own networks; it takes no backbone")
        if isinstance(backbone, str):
            options["backbone"] = backbone
        else:
            given = backbone
    config = make_config(name, options)
    with building(given, load_pretrained):
        return cls(config, in_shape)


def describe(name: str) -> str:
    doc = (get(name).__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _discover() -> None:
    """Import every module of this package, which registers the methods it defines: a new method is one
    file here, with no list to update."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
