"""Device and numeric precision choices, resolved once and recorded in the run config."""
from __future__ import annotations

import contextlib

import torch

from .errors import FewshotError

#: fp32; bf16 autocast; fp16 autocast with a gradient scaler (dynamic loss scaling, :func:`grad_scaler`)
PRECISIONS = ("fp32", "bf16", "fp16")


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


#: CPU instruction-set tiers that decide ``auto`` precision and layout, slowest first
ISA_TIERS = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")

# the highest tier each cap of an emulation variable allows (oneDNN's ONEDNN_MAX_CPU_ISA, MKL's
# MKL_ENABLE_INSTRUCTIONS, ATen's capability as torch.backends.cpu.get_cpu_capability() reports it)
_ONEDNN_CAPS = {"sse41": "baseline", "avx": "baseline", "avx2": "avx2", "avx2_vnni": "avx2", "avx2_vnni_2": "avx2",
                "avx512_core": "avx512", "avx512_core_vnni": "avx512", "avx512_core_bf16": "avx512_bf16",
                "avx512_core_fp16": "avx512_bf16", "avx10_1_512": "avx512_bf16"}
_MKL_CAPS = {"sse4_2": "baseline", "avx": "baseline", "avx2": "avx2", "avx2_e1": "avx2"}
_ATEN_CAPS = {"default": "baseline", "no avx": "baseline", "avx2": "avx2"}


def cpu_hardware_tier(flags: set | None = None) -> str:
    """The best of :data:`ISA_TIERS` this CPU has, from its feature flags (what the silicon offers):
    ``/proc/cpuinfo``'s, or torch's CPU probes where there is none; ``flags`` replaces them (tests)."""
    checks = [("amx", "_is_amx_tile_supported", ("amx_bf16", "amx_tile")),
              ("avx512_bf16", "_is_avx512_bf16_supported", ("avx512_bf16",)),
              ("avx512", "_is_avx512_supported", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
              ("avx2", "_is_avx2_supported", ("avx2", "fma"))]
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((l for l in f if l.startswith("flags")), "").split())
        except OSError:
            flags = set()
    for tier, probe, needed in checks:
        if flags:
            if all(n in flags for n in needed):
                return tier
            continue
        try:
            if getattr(torch.cpu, probe)():
                return tier
        except (AttributeError, RuntimeError):
            pass
    return "baseline"


def cpu_isa(hardware: str | None = None, environ=None, aten: str | None = None) -> str:
    """The instruction-set tier (of :data:`ISA_TIERS`) this process really computes with: the hardware's,
    capped by what ATen (``ATEN_CPU_CAPABILITY``), oneDNN (``ONEDNN_MAX_CPU_ISA``) and MKL
    (``MKL_ENABLE_INSTRUCTIONS``) are told to use. So a run with those variables set to AVX2 on an AMX part
    resolves ``auto`` exactly as an AVX2-only CPU would. (The arguments replace the hardware tier, the
    environment and ATen's reported capability, for tests.)"""
    import os
    env = os.environ if environ is None else environ
    tier = cpu_hardware_tier() if hardware is None else hardware
    if aten is None:
        aten = torch.backends.cpu.get_cpu_capability()
    caps = [_ATEN_CAPS.get(aten.strip().lower()),
            _ONEDNN_CAPS.get(env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA", "")).strip().lower()),
            _MKL_CAPS.get(env.get("MKL_ENABLE_INSTRUCTIONS", "").strip().lower())]
    rank = min([ISA_TIERS.index(tier)] + [ISA_TIERS.index(c) for c in caps if c])
    return ISA_TIERS[rank]


#: what ``precision: auto`` and ``channels_last: auto`` pick on a CPU of each tier, from measurements of the
#: Conv-4 protonet step and the MAML task loop (BENCHMARKS.md, "What auto picks"): bf16 autocast only where
#: the CPU has bf16 instructions (without them oneDNN has no native bf16 convolution: 15-50x slower than fp32);
#: channels-last wherever oneDNN's AVX2/AVX-512 kernels run (its NHWC convolutions need no blocked-layout
#: reorders and its max-pool is faster), NCHW on CPUs without AVX2.
AUTO_CPU = {
    "amx": ("bf16", True),
    "avx512_bf16": ("bf16", True),
    "avx512": ("fp32", True),
    "avx2": ("fp32", True),
    "baseline": ("fp32", False),
}


def auto_cpu_choice(isa: str | None = None) -> tuple:
    """``(precision, channels_last)`` that ``auto`` resolves to on this CPU (or on a CPU of tier ``isa``)."""
    return AUTO_CPU[isa or cpu_isa()]


def cpu_has_fast_bf16() -> bool:
    """True when this process computes with native bf16 matrix units (AMX) or AVX-512 bf16 instructions."""
    return ISA_TIERS.index(cpu_isa()) >= ISA_TIERS.index("avx512_bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 autocast where the hardware runs it fast (bf16 GPUs; CPUs by :data:`AUTO_CPU`: AMX and
    AVX-512-bf16), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return auto_cpu_choice()[0] if device.type == "cpu" else "fp32"
    if precision not in PRECISIONS:
        raise FewshotError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed-precision context: bf16 (or fp16) autocast for convolutions and matrix products, fp32 elsewhere."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str):
    """The gradient scaler fp16 training needs (fp16's narrow exponent range underflows small gradients
    unless the loss is scaled up first; the scale adapts, halving on overflow), ``None`` for fp32/bf16.
    For the gradient-based family it scales the outer loss only: inner-loop gradients are taken unscaled,
    which is why ``auto`` picks bf16, never fp16."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def resolve_channels_last(channels_last: str | bool, device: torch.device) -> bool:
    """"auto" -> channels-last on CPUs where it measured faster (:data:`AUTO_CPU`: AVX2 and up), off elsewhere."""
    if isinstance(channels_last, str):
        v = channels_last.strip().lower()
        if v == "auto":
            return device.type == "cpu" and auto_cpu_choice()[1]
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise FewshotError(f"channels_last must be auto, true or false, got {channels_last!r}")
    return bool(channels_last)
