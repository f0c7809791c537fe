"""Pretrained weights from a local file, read without ever unpickling code.

- ``.pt`` / ``.pth`` (and any other suffix): ``torch.load(weights_only=True)``, which only rebuilds
  tensors and plain containers and refuses any other pickled object. The file holds a state_dict, or a
  dict with one under ``"state_dict"`` or ``"model"`` (a fewshot checkpoint keeps the method's under
  ``"model"``: ``prefix="backbone."`` picks a metric method's encoder out of it).
- ``.safetensors``: with the ``safetensors`` package when it is installed, else with the small reader
  here (:func:`read_safetensors`; the format is an 8-byte little-endian header length, a JSON header of
  ``{name: {"dtype", "shape", "data_offsets"}}`` and the raw little-endian bytes). :func:`write_safetensors`
  writes the format.

:func:`load_weights` compares names and shapes before it loads anything, and reports every missing key,
unexpected key and shape mismatch in one line.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import FewshotError
from .backbones import declared_head

PathLike = Union[str, os.PathLike]

#: safetensors dtype codes and the torch dtypes they stand for
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)
_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
#: a header larger than this is refused before it is read (the safetensors package uses the same bound)
MAX_HEADER = 100_000_000


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ safetensors
def write_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (name -> tensor) to ``path`` in the safetensors format: the header padded with
    spaces to a multiple of 8 bytes, the tensors' bytes in name order, little-endian."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise FewshotError("writing safetensors needs a little-endian machine")
    header: Dict[str, object] = {}
    blobs: List[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise FewshotError(f"safetensors holds tensors only; {name!r} is a {type(t).__name__}")
        if t.dtype not in _CODES:
            raise FewshotError(f"safetensors has no dtype for {name!r} ({t.dtype})")
        t = t.detach().to("cpu").contiguous()
        # viewed as bytes (a 0-d tensor first made 1-d), so every dtype, bf16 included, is written raw
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_safetensors(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` from a safetensors file, every field checked; a bad file is a one-line
    :class:`FewshotError` naming it."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FewshotError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > MAX_HEADER or 8 + n > size:
            raise FewshotError(f"{path} is not a safetensors file (header length {n} does not fit its {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise FewshotError(f"{path} is not a safetensors file (its header is not JSON: {_first_line(e)})") from None
        body = f.read()
    if not isinstance(header, dict):
        raise FewshotError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FewshotError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets") from None
        if code not in SAFETENSORS_DTYPES:
            raise FewshotError(f"{path}: tensor {name!r} has dtype {code!r}, which this reader does not know")
        dtype = SAFETENSORS_DTYPES[code]
        count = 1
        for s in shape:
            count *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not (isinstance(begin, int) and isinstance(end, int)) or not 0 <= begin <= end <= len(body) \
                or end - begin != count * itemsize or min(shape, default=0) < 0:
            raise FewshotError(f"{path}: tensor {name!r} ({code} {shape}) has data offsets {[begin, end]} "
                               f"that do not fit it or the file")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8)
            tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        return read_safetensors(path)[0]
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:
        raise FewshotError(f"cannot read safetensors file {path}: {_first_line(e)}") from None


# ------------------------------------------------------------------------------------------ state_dicts
def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The state_dict in ``path`` (``.safetensors``, or a torch file read with ``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FewshotError(f"no weights file at {path}")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything but tensors and plain containers
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        code = next((ln for ln in lines if "GLOBAL" in ln), None)  # a request to import an object
        if code is not None:
            raise FewshotError(f"refusing to load {path}: it holds pickled objects other than tensors, which "
                               f"are never unpickled ({code})") from None
        after = [b for a, b in zip(lines, lines[1:]) if a.endswith("WeightsUnpickler error:")]
        detail = after[0] if after else (lines[0] if lines else type(e).__name__)
        raise FewshotError(f"cannot read weights file {path} as a torch file: {detail}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise FewshotError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FewshotError(f"{path} is not a state_dict: {bad[0]!r} is a {type(obj[bad[0]]).__name__}, "
                           f"not a tensor (a dict holding one under 'state_dict' or 'model' also works)")
    return {str(k): v for k, v in obj.items()}


def save_weights(module: nn.Module, path: PathLike) -> None:
    """Write ``module``'s state_dict to ``path``: safetensors for a ``.safetensors`` suffix, else a
    ``torch.save`` file that :func:`read_state_dict` reads back with ``weights_only=True``."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        write_safetensors(state, path)
    else:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)


@dataclass
class LoadReport:
    """What :func:`load_weights` did: how many tensors it loaded, the module's keys the file lacked
    (``missing``), the file's keys the module lacks (``unexpected``), the file's head keys it left out
    (``skipped_head``: the module's head is of another size, or absent) and the module's head keys left
    as they were (``new_head``: the file has no head, or one that does not fit)."""
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    skipped_head: List[str] = field(default_factory=list)
    new_head: List[str] = field(default_factory=list)


def _few(names: List[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def load_weights(module: nn.Module, path: PathLike, strict: bool = True, prefix: Optional[str] = None,
                 head: Optional[str] = "auto") -> LoadReport:
    """Load the state_dict in ``path`` into ``module``, checking names and shapes first.

    ``prefix``: take only the file's keys that start with it, with it removed (``"backbone."`` for the
    encoder of a fewshot checkpoint, ``"module."`` for a DataParallel file; a file whose every key starts
    with ``"module."`` has it removed anyway when the module has no such keys). ``head``: the classifier
    head whose keys are left out where they do not fit, so that ImageNet weights load into an encoder
    (head absent) or a network with a new 5-way head (another size), and an encoder's file (no head)
    loads into a whole network, whose head keeps its initialisation; ``"auto"``: the head the module
    declares (:func:`~fewshot.models.backbones.declared_head`: ``fc`` for the registered networks, even
    an encoder's ``nn.Identity``; nothing for a module that declares none);
    ``None``: no exception. Counters of batch-norm layers (``num_batches_tracked``), which many files
    leave out, are never counted missing.

    With ``strict`` (the default) any missing or unexpected key is a one-line :class:`FewshotError` with
    their counts and first names; a shape mismatch always is. Returns a :class:`LoadReport`.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    own = module.state_dict()
    if prefix:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not picked:
            raise FewshotError(f"weights file {path} has no key starting with {prefix!r} "
                               f"(its keys start like: {_few(sorted(state))})")
        state = picked
    elif state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    head_key = declared_head(module) if head == "auto" else head
    report = LoadReport()
    if head_key is not None:
        hp = head_key + "."
        in_file = [k for k in state if k.startswith(hp)]
        if not in_file or any(k not in own or tuple(own[k].shape) != tuple(state[k].shape) for k in in_file):
            report.skipped_head = sorted(in_file)
            for k in in_file:
                del state[k]
            report.new_head = sorted(k for k in own if k.startswith(hp))
            own = {k: v for k, v in own.items() if not k.startswith(hp)}
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in sorted(state) if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch{'es' if len(shapes) > 1 else ''} ({_few(shapes, 3)})")
    if strict and missing:
        problems.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} ({_few(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''} ({_few(unexpected)})")
    if problems:
        hint = "; pass strict=False to load the rest" if not shapes else ""
        raise FewshotError(f"weights file {path} does not fit {type(module).__name__}: {'; '.join(problems)}{hint}")
    usable = {k: v for k, v in state.items() if k in own}
    module.load_state_dict(usable, strict=False)
    report.loaded, report.missing, report.unexpected = len(usable), missing, unexpected
    return report
