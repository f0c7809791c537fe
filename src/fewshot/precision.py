"""Device and numeric precision choices, resolved once and recorded in the run config."""
from __future__ import annotations

import contextlib

import torch

from .errors import FewshotError

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FewshotError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FewshotError(f"device {device} requested but CUDA is not available")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX) or AVX-512 bf16 instructions."""
    try:
        if torch.cpu._is_amx_tile_supported():  # type: ignore[attr-defined]
            return True
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 autocast where the hardware runs it fast (AMX/AVX-512-bf16 CPUs, bf16 GPUs), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise FewshotError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed-precision context: bf16 autocast for convolutions and matrix products, fp32 elsewhere."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_channels_last(channels_last: str | bool, device: torch.device) -> bool:
    """"auto" -> channels-last on CPU (oneDNN's fast layout for convolutions), off elsewhere."""
    if isinstance(channels_last, str):
        v = channels_last.strip().lower()
        if v == "auto":
            return device.type == "cpu"
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise FewshotError(f"channels_last must be auto, true or false, got {channels_last!r}")
    return bool(channels_last)
