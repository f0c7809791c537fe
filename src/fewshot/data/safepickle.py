"""Reading pickles of numpy arrays without trusting them.

Data sets shipped as pickles (CIFAR-100, the mini-ImageNet cache files) hold only dicts, lists, strings,
numbers and numpy arrays, yet ``pickle.load`` would build any object a file names, which is how a tampered
file runs code. :func:`load_pickle` unpickles with an unpickler that admits exactly the globals numpy needs
to rebuild arrays, dtypes and scalars, and refuses every other one with a one-line error.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from ..errors import FewshotError

#: The only globals a data pickle may name: what numpy's ``__reduce__`` writes for arrays (protocols 0-4:
#: ``_reconstruct`` + ``ndarray`` + ``dtype``; protocol 5: ``_frombuffer``) and scalars, under numpy 1's
#: module names and numpy 2's, plus ``_codecs.encode`` and ``bytes`` (how Python 3 writes bytes, an array's
#: buffer among them, into protocol 0-2 pickles).
ALLOWED = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes"),
})


class UnsafePickle(pickle.UnpicklingError):
    """A pickle named a global outside :data:`ALLOWED`."""


class SafeUnpickler(pickle.Unpickler):
    """Builds only containers, strings, numbers and numpy arrays; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise UnsafePickle(f"{module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]   # numpy 1's files: same function, new home
        return super().find_class(module, name)


def load_pickle(source: Union[bytes, str, os.PathLike, BinaryIO], label: str | None = None) -> Any:
    """Unpickle ``source`` (raw bytes, a file path or an open binary file) with :class:`SafeUnpickler`.

    Python 2 pickles are read with ``encoding="latin1"`` (what numpy needs for their array buffers), so
    their ``str`` keys arrive as ``str`` and their byte strings may arrive as ``bytes``.

    Raises:
        FewshotError: ``refusing to load MODULE.NAME from LABEL ...`` for a global outside :data:`ALLOWED`
            (nothing is executed); ``cannot read LABEL: ...`` for a missing, corrupt or truncated file.
    """
    if label is None:
        label = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(getattr(source, "name", source))
    try:
        if isinstance(source, (bytes, bytearray)):
            return SafeUnpickler(io.BytesIO(source), encoding="latin1").load()
        if isinstance(source, (str, os.PathLike)):
            with open(Path(source), "rb") as fh:
                return SafeUnpickler(fh, encoding="latin1").load()
        return SafeUnpickler(source, encoding="latin1").load()
    except UnsafePickle as e:
        raise FewshotError(f"refusing to load {e} from {label}: a data pickle may hold only numbers, strings, "
                           "containers and numpy arrays") from None
    except FileNotFoundError:
        raise FewshotError(f"no such file: {label}") from None
    except MemoryError:
        raise FewshotError(f"cannot read {label}: out of memory") from None
    except Exception as e:  # corrupt, truncated or not a pickle at all
        raise FewshotError(f"cannot read {label}: {e.__class__.__name__}: {e}") from None
