"""What ``precision: auto`` and ``channels_last: auto`` pick on a CPU: the instruction-set tier read from the
CPU's flags and capped by the variables that hold ATen, oneDNN and MKL to an older instruction set (so an
emulated AVX2 run resolves like an AVX2-only CPU), and the measured rule per tier. Features are faked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fewshot import precision
from fewshot.precision import AUTO_CPU, ISA_TIERS, cpu_hardware_tier, cpu_isa

SAPPHIRE_RAPIDS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16",
                   "amx_tile"}
EPYC_ZEN3 = {"avx", "avx2", "fma", "sse4_2"}
SKYLAKE_SP = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
COOPER_LAKE = SKYLAKE_SP | {"avx512_bf16"}


@pytest.mark.parametrize("flags, tier", [(SAPPHIRE_RAPIDS, "amx"), (COOPER_LAKE, "avx512_bf16"),
                                         (SKYLAKE_SP, "avx512"), (EPYC_ZEN3, "avx2"), ({"sse4_2"}, "baseline")])
def test_hardware_tier_from_flags(flags, tier) -> None:
    assert cpu_hardware_tier(flags) == tier


@pytest.mark.parametrize("env, aten, tier", [
    ({}, "AVX512", "amx"),                                               # nothing capped
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX512", "avx2"),
    ({"DNNL_MAX_CPU_ISA": "avx2"}, "AVX512", "avx2"),                     # oneDNN's older name
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "AVX512", "avx512"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AVX512", "avx512_bf16"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX10_1_512_AMX"}, "AVX512", "amx"),         # a cap above the hardware
    ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "AVX512", "avx2"),
    ({}, "AVX2", "avx2"),                                                 # ATEN_CPU_CAPABILITY=avx2
    ({}, "DEFAULT", "baseline"),
    ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "AVX2",
     "avx2"),                                                             # the benchmarks' --isa avx2
])
def test_emulation_variables_cap_the_tier(env, aten, tier) -> None:
    assert cpu_isa("amx", env, aten) == tier
    assert cpu_isa("avx2", env, aten) == ISA_TIERS[min(ISA_TIERS.index(tier), ISA_TIERS.index("avx2"))]


@pytest.mark.parametrize("tier, prec, layout", [("amx", "bf16", True), ("avx512_bf16", "bf16", True),
                                                ("avx512", "fp32", True), ("avx2", "fp32", True),
                                                ("baseline", "fp32", False)])
def test_auto_follows_the_rule_of_the_tier(monkeypatch, tier, prec, layout) -> None:
    """bf16 only with bf16 instructions (AMX, AVX-512-bf16); channels-last from AVX2 up; never on a GPU."""
    monkeypatch.setattr(precision, "cpu_isa", lambda *a, **k: tier)
    cpu = torch.device("cpu")
    assert AUTO_CPU[tier] == (prec, layout)
    assert precision.resolve_precision("auto", cpu) == prec
    assert precision.resolve_channels_last("auto", cpu) is layout
    assert precision.cpu_has_fast_bf16() is (prec == "bf16")
    assert precision.resolve_channels_last("auto", torch.device("meta")) is False
    assert precision.resolve_precision("fp32", cpu) == "fp32" and precision.resolve_channels_last("on", cpu)


def test_an_emulated_avx2_process_resolves_like_an_avx2_cpu() -> None:
    """With the three variables set (as ``benchmarks/* --isa avx2`` sets them), ``auto`` in a fresh process is
    fp32 with channels-last whatever the CPU underneath, and torch's kernels really are capped."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    code = ("import torch; from fewshot.precision import cpu_isa, resolve_precision, resolve_channels_last; "
            "c = torch.device('cpu'); print(torch.backends.cpu.get_cpu_capability(), cpu_isa(), "
            "resolve_precision('auto', c), resolve_channels_last('auto', c))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cap, isa, prec, layout = out.stdout.split()
    if cpu_hardware_tier() == "baseline":
        pytest.skip("this CPU has no AVX2")
    assert (cap, isa, prec, layout) == ("AVX2", "avx2", "fp32", "True")
