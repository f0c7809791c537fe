"""Dataclasses that remember which fields were set explicitly.

A run's settings come from three sources: what the user sets, the literature settings of the chosen
method (its ``run_defaults``) and the dataclass defaults. :func:`tracks_explicit` lets the second fill
exactly the fields the user left alone, the same way for the Python API and the command line:
a field is *explicit* once it is passed to the constructor or assigned afterwards.
"""
from __future__ import annotations

import functools
from dataclasses import fields


def tracks_explicit(cls):
    """Class decorator (put it above ``@dataclass``): instances record the fields given to the constructor
    or assigned later in ``explicit(obj)``; the dataclass's own default assignments do not count."""
    init = cls.__init__
    names = [f.name for f in fields(cls)]
    known = set(names)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_explicit", None)      # the generated __init__'s assignments: defaults
        init(self, *args, **kwargs)
        object.__setattr__(self, "_explicit", set(names[:len(args)]) | (set(kwargs) & known))

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        given = self.__dict__.get("_explicit")
        if given is not None and name in known:
            given.add(name)

    cls.__init__ = __init__
    cls.__setattr__ = __setattr__
    return cls


def explicit(obj) -> set:
    """The names of the fields of ``obj`` (a :func:`tracks_explicit` dataclass) set explicitly."""
    return set(obj.__dict__.get("_explicit") or ())


def mark_explicit(obj, names=None) -> None:
    """Count ``names`` (default: every field) of ``obj`` as explicitly set (a recipe read from a file is a
    complete configuration)."""
    given = obj.__dict__.get("_explicit")
    if given is None:
        given = set()
        object.__setattr__(obj, "_explicit", given)
    given.update(names if names is not None else (f.name for f in fields(obj)))
