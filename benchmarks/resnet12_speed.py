"""ResNet-12 training speed and peak memory on 84x84 RGB episodes (CPU): ours against easyfsl and learn2learn
in the same run.

Two comparisons, each configuration in its own process so that its peak resident memory (``ru_maxrss``;
for a MAML run split over worker processes: the main process plus the largest worker's peak times the
number of workers) is its own:

- **ProtoNet**, 5-way 5-shot 15-query, one training step = forward of the 100 images, backward, Adam:
  fewshot's ``protonet --backbone resnet12`` (the TADAM/MetaOptNet ResNet-12: 4 blocks of three 3x3 convs,
  64-160-320-640 channels, 2x2 max-pool after each block, no DropBlock by default) against easyfsl 1.5.0's
  ``resnet12()`` + ``PrototypicalNetworks`` via ``../shared/anchors/anchor_resnet12.py protonet``. easyfsl's
  ``resnet12`` is another network of the same widths: a torchvision-style ResNet (3x3 stem at full
  resolution, BasicBlocks [1, 1, 2, 1] with strided convs, no DropBlock). So a third row trains fewshot's
  protonet on a module of exactly easyfsl's layout (:func:`easyfsl_layout`, built here from fewshot's own
  ``BasicBlock``): the same network and the same arithmetic, only the two libraries' training steps differ.
- **MAML**, 5-way 1-shot 15-query, meta-batch 4, 5 inner steps of lr 0.01, second order, Adam outer step:
  fewshot's ``maml`` on ResNet-12 with learn2learn's regularisation (:func:`l2l_resnet12`: dropout 0.1 after
  blocks 1-2, DropBlock 5x5 after blocks 3-4 whose rate ramps from 0 to 0.1 over 40 000 forward passes, as
  learn2learn's ``ResNet12`` defaults) against learn2learn 0.2.0's ``MAML`` on ``l2l.vision.models.ResNet12``
  via ``anchor_resnet12.py maml ITERS 4 5``.

Ours run in the precision/layout ``auto`` picks on this CPU (bf16 autocast + channels-last where the CPU has
AMX) and in fp32 NCHW. Images are uniform random pixels drawn fresh every step, as the peers' (the arithmetic
does not depend on them). Every configuration does one untimed warm-up step (episode or meta-iteration), as
the anchor does, then ``--proto-iters`` / ``--maml-iters`` timed ones.

usage: python benchmarks/resnet12_speed.py [--proto-iters 4] [--maml-iters 1] [--maml-batch 4] [--maml-steps 5]
       [--configs proto-peer,...] [--no-peer] [--isa native|avx2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()
WAYS, QUERIES, SIZE = 5, 15, 84

#: name: (method, precision, channels_last, backbone spec); "peer" rows run the anchor instead
CONFIGS = {
    "proto-peer": ("protonet", "peer", None, None),
    "proto-auto": ("protonet", "auto", "auto", "resnet12"),
    "proto-fp32": ("protonet", "fp32", False, "resnet12"),
    "proto-auto-easyfsl-layout": ("protonet", "auto", "auto", f"{HERE}:easyfsl_layout"),
    "proto-fp32-easyfsl-layout": ("protonet", "fp32", False, f"{HERE}:easyfsl_layout"),
    "maml-peer": ("maml", "peer", None, None),
    "maml-auto": ("maml", "auto", "auto", f"{HERE}:l2l_resnet12"),
    "maml-fp32": ("maml", "fp32", False, f"{HERE}:l2l_resnet12"),
}
DEFAULT_CONFIGS = ("proto-peer", "proto-auto", "proto-fp32", "proto-auto-easyfsl-layout", "maml-peer",
                   "maml-auto", "maml-fp32")


# ------------------------------------------------------------------------------------------ the networks
def easyfsl_layout(in_shape, outputs=None):
    """easyfsl 1.5.0's ``resnet12()`` layout from fewshot's own blocks: conv 3x3 (3 -> 64, stride 1, no bias),
    batch norm, ReLU; BasicBlock stages of [1, 1, 2, 1] blocks with 64, 160, 320, 640 channels (stride 1, 2,
    2, 2; a 1x1 conv + batch norm shortcut where the shape changes); global average -> 640 features.
    He (fan-out) initialisation of the convolutions, batch norm weight 1 / bias 0, as easyfsl."""
    from fewshot.models.backbones import BasicBlock, _init_convs
    c = int(in_shape[0])
    layers, cin = [nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)], 64
    for width, n, stride in zip((64, 160, 320, 640), (1, 1, 2, 1), (1, 2, 2, 2)):
        for i in range(n):
            layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if outputs:
        layers.append(nn.Linear(cin, int(outputs)))
    net = nn.Sequential(*layers)
    _init_convs(net)
    return net


def l2l_resnet12(in_shape, outputs=None):
    """fewshot's ResNet-12 with learn2learn's ``ResNet12`` regularisation: rate 0.1 (dropout after blocks 1-2,
    DropBlock of 5x5 after blocks 3-4, ramped over 40 000 forward passes)."""
    from fewshot.models.backbones import ResNet12
    return ResNet12(in_shape, outputs, drop_rate=0.1, drop_block=5, drop_ramp=40000)


def macs(module: nn.Module, shape=(3, SIZE, SIZE)) -> float:
    """Multiply-accumulates of the convolutions and linear layers of one forward pass on one image."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
    hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(torch.zeros(1, *shape))
    for h in hs:
        h.remove()
    return total[0]


# ------------------------------------------------------------------------------------------ one configuration
def episode(shots: int, batch: int = 1):
    """Random 84x84 RGB tasks as the anchor draws them (support, then queries, labels class-major)."""
    from fewshot.episodes import Episode
    ys = torch.arange(WAYS).repeat_interleave(shots).expand(batch, -1).contiguous()
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(batch, -1).contiguous()
    return Episode(torch.rand(batch, WAYS * shots, 3, SIZE, SIZE), ys,
                   torch.rand(batch, WAYS * QUERIES, 3, SIZE, SIZE), yq, WAYS, shots, QUERIES)


def worker(name: str, iters: int, meta_batch: int, steps: int) -> dict:
    import fewshot as fs
    from fewshot.models import set_channels_last
    from fewshot.parallel import tune_allocator
    from fewshot.precision import autocast, resolve_channels_last, resolve_precision
    method, prec, cl, spec = CONFIGS[name]
    cpu = torch.device("cpu")
    tune_allocator()            # as training on a CPU does (the MAML task loop did it already)
    prec, cl = resolve_precision(prec, cpu), resolve_channels_last(cl, cpu)
    torch.manual_seed(0)
    if method == "protonet":
        m = fs.methods.build("protonet", (3, SIZE, SIZE), backbone=spec)
        shots, batch = 5, 1
    else:
        m = fs.methods.build("maml", (3, SIZE, SIZE), backbone=spec, outputs=WAYS, inner_lr=0.01,
                             inner_steps=steps, first_order=False)
        shots, batch = 1, meta_batch
    set_channels_last(m, cl)
    m.train()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    t = None
    for i in range(1 + iters):
        if i == 1:
            t = time.perf_counter()            # one warm-up step, as the anchor
        ep = episode(shots, batch)
        with autocast(cpu, prec):
            loss, _ = m.loss(ep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t
    pool = m.__dict__.get("_pool")
    procs = 1 + (pool.workers if pool is not None else 0)
    if pool is not None:
        pool.close()            # waits for the workers, so their peak RSS is counted in RUSAGE_CHILDREN
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    peak += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024 * (procs - 1)
    rate = iters * batch / dt
    return {"config": name, "precision": prec, "channels_last": cl, "processes": procs, "iters": iters,
            "per_s": round(rate, 4), "s_per": round(1 / rate, 2), "peak_rss_mb": peak}


def run_config(name: str, a) -> dict:
    """One configuration in a fresh process: ours through ``--worker``, the peers through their anchor."""
    from common import ANCHORS, PEERS_PYTHON
    method = CONFIGS[name][0]
    iters = a.proto_iters if method == "protonet" else a.maml_iters
    if CONFIGS[name][1] == "peer":
        if not PEERS_PYTHON.exists() or not (ANCHORS / "anchor_resnet12.py").exists():
            return {"config": name, "error": "the peers' environment is missing"}
        cmd = [str(PEERS_PYTHON), "anchor_resnet12.py", method, str(iters)]
        if method == "maml":
            cmd += [str(a.maml_batch), str(a.maml_steps)]
        p = subprocess.run(cmd, cwd=ANCHORS, capture_output=True, text=True, env=dict(os.environ, FIRST="0"))
    else:
        p = subprocess.run([sys.executable, str(HERE), "--worker", name, "--proto-iters", str(a.proto_iters),
                            "--maml-iters", str(a.maml_iters), "--maml-batch", str(a.maml_batch),
                            "--maml-steps", str(a.maml_steps)], capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode or not lines:
        return {"config": name, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    r = json.loads(lines[-1])
    if "per_s" not in r:                     # an anchor's line
        rate = r.get("episodes_per_s", r.get("tasks_per_s"))
        r = {"config": name, "precision": "fp32", "channels_last": False, "processes": 1, "iters": iters,
             "per_s": rate, "s_per": round(1 / rate, 2), "peak_rss_mb": r["peak_rss_mb"]}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proto-iters", type=int, default=4, help="timed protonet episodes per configuration")
    ap.add_argument("--maml-iters", type=int, default=1, help="timed MAML meta-iterations per configuration")
    ap.add_argument("--maml-batch", type=int, default=4, help="MAML tasks per meta-iteration")
    ap.add_argument("--maml-steps", type=int, default=5, help="MAML inner steps")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--isa", default="native", help="instruction set for every process (common.ISA_ENV)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        method = CONFIGS[a.worker][0]
        print(json.dumps(worker(a.worker, a.proto_iters if method == "protonet" else a.maml_iters,
                                a.maml_batch, a.maml_steps)))
        return
    sys.path.insert(0, str(HERE.parent))
    from common import ISA_ENV, machine, table, use_isa
    if a.isa not in ISA_ENV:
        ap.error(f"--isa must be one of {', '.join(ISA_ENV)}")
    use_isa(a.isa)
    names = [n for n in a.configs.split(",") if n and not (a.no_peer and CONFIGS.get(n, ("", ""))[1] == "peer")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    from fewshot.models.backbones import ResNet12
    print(f"# {machine()}")
    print(f"# MACs per 84x84 image (forward): fewshot resnet12 {macs(ResNet12((3, SIZE, SIZE))) / 1e9:.2f} G, "
          f"easyfsl resnet12 layout {macs(easyfsl_layout((3, SIZE, SIZE))) / 1e9:.2f} G", flush=True)
    print(f"# protonet: 1 warm-up + {a.proto_iters} timed episodes; MAML: 1 warm-up + {a.maml_iters} timed "
          f"meta-iterations of {a.maml_batch} tasks, {a.maml_steps} inner steps", flush=True)
    res = {}
    for n in names:
        t = time.time()
        res[n] = run_config(n, a)
        print(f"# {n} ({time.time() - t:.0f} s wall): {json.dumps(res[n])}", flush=True)
    rows = []
    for method, unit, peer in (("protonet", "episodes/s", "proto-peer"), ("maml", "tasks/s", "maml-peer")):
        base = res.get(peer)
        for n in names:
            if CONFIGS[n][0] != method:
                continue
            r = res[n]
            if "error" in r:
                rows.append([n, "", "", f"error: {r['error'][:70]}", "", "", ""])
                continue
            who = {"proto-peer": "easyfsl 1.5.0 resnet12 + PrototypicalNetworks",
                   "maml-peer": "learn2learn 0.2.0 MAML, l2l ResNet12"}.get(n, f"fewshot {method} ({n})")
            layout = "channels-last" if r["channels_last"] else "NCHW"
            ok = base is not None and "error" not in base
            rows.append([who, f"{r['precision']} {layout}", f"{r['per_s']:.4g} {unit}", f"{r['s_per']:.2f}",
                         f"{r['peak_rss_mb']}" + (f" ({r['processes']} processes)" if r["processes"] > 1 else ""),
                         f"{r['per_s'] / base['per_s']:.2f}x" if ok else "-",
                         f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if ok else "-"])
    print()
    print(table(rows, ["implementation", "precision", "speed", "s per episode/task", "peak RSS MB",
                       "speed vs peer", "memory vs peer"]))
    if any("error" in r for r in res.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
