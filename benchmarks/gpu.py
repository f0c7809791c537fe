"""GPU speed and memory: protonet (Conv-4 and ResNet-12) episodes/s, MAML Conv-4 tasks/s (vmap and loop),
peak GPU memory, and the peers on the same GPU in the same run when their environment is there.

Rows (each configuration in its own process, so its peak memory is its own):

- protonet Conv-4, Omniglot 60-way 5-shot 5-query 28x28 (the CPU benchmark's shape), fp32 / bf16 autocast,
  eager and ``torch.compile`` (the protonet step has no double backward, so compiling it is allowed);
- protonet ResNet-12 (64-160-320-640), 5-way 5-shot 15-query 84x84 RGB, fp32 / bf16;
- MAML Conv-4, Omniglot 5-way 1-shot 15-query, meta-batch 32, one inner step (lr 0.4), second and first
  order, tasks as a vmap axis and as a loop;
- easyfsl 1.5.0 (PrototypicalNetworks on Conv-4, same shape) and learn2learn 0.2.0 (MAML on its Conv-4
  ``OmniglotCNN``, same settings) on the same GPU through ``peers/gpu_peers.py``, when ``$PEERS_VENV`` exists
  on the machine and its torch sees the GPU (the anchors in ``../shared/anchors`` run on the CPU only);
  otherwise the table says no peer was available rather than printing a ratio.

The data set and the episode sampler live on the device (``fs.episodes(..., device="cuda")``: the uint8
images are moved once and episodes are gathered by index there, no host round trip per step).
Without a GPU, ``--device cpu --quick`` runs every configuration for a couple of steps (a smoke test of the
script, not a measurement).

usage: python benchmarks/gpu.py [--device cuda] [--steps 30] [--only protonet-conv4-fp32,...] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import OMNIGLOT, PEERS_PYTHON, TEST_ALPHABETS, machine, table

HERE = Path(__file__).resolve().parent
#: name: (method, backbone, data, ways, shots, queries, batch, precision, extra)
CONFIGS = {
    "protonet-conv4-fp32": ("protonet", "conv4", "omniglot", 60, 5, 5, 1, "fp32", {}),
    "protonet-conv4-bf16": ("protonet", "conv4", "omniglot", 60, 5, 5, 1, "bf16", {}),
    "protonet-conv4-fp32-compile": ("protonet", "conv4", "omniglot", 60, 5, 5, 1, "fp32", {"compile": True}),
    "protonet-resnet12-fp32": ("protonet", "resnet12", "random84", 5, 5, 15, 1, "fp32", {}),
    "protonet-resnet12-bf16": ("protonet", "resnet12", "random84", 5, 5, 15, 1, "bf16", {}),
    "maml-conv4-vmap-2nd": ("maml", "conv4", "omniglot", 5, 1, 15, 32, "fp32", {"vectorize": "vmap"}),
    "maml-conv4-loop-2nd": ("maml", "conv4", "omniglot", 5, 1, 15, 32, "fp32", {"vectorize": "loop"}),
    "maml-conv4-vmap-1st": ("maml", "conv4", "omniglot", 5, 1, 15, 32, "fp32",
                            {"vectorize": "vmap", "first_order": True}),
    "maml-conv4-loop-1st": ("maml", "conv4", "omniglot", 5, 1, 15, 32, "fp32",
                            {"vectorize": "loop", "first_order": True}),
}


def _dataset(kind: str, data: str):
    import fewshot as fs
    if kind == "omniglot":
        ds = fs.data.omniglot(data, split="small")
        train, _ = ds.split_by_group(TEST_ALPHABETS)
        return train.with_rotations()
    # random 84x84 RGB images, 64 classes x 20 (speed and memory only: the arithmetic ignores the pixels)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 20, 3, 84, 84), dtype=torch.uint8, generator=g)
    return fs.data.ClassDataset.from_class_tensors(list(x), [f"c{i}" for i in range(64)])


def worker(name: str, steps: int, data: str, device: str, warmup: int = 3) -> dict:
    import fewshot as fs
    from fewshot.precision import autocast
    method, backbone, kind, ways, shots, queries, batch, prec, extra = CONFIGS[name]
    dev = torch.device(device)
    extra = dict(extra)
    compiled = extra.pop("compile", False)
    train = _dataset(kind, data)
    sampler = fs.episodes(train, ways, shots, queries, batch=batch, seed=0, device=dev)
    torch.manual_seed(0)
    opts = dict(backbone=backbone, **extra)
    if method == "maml":
        opts.update(outputs=ways, inner_lr=0.4, inner_steps=1, workers=1)
    m = fs.methods.build(method, train.image_shape, **opts).to(dev)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    loss_fn = torch.compile(m.loss) if compiled else m.loss

    def step():
        ep = sampler.sample()
        with autocast(dev, prec):
            loss, _ = loss_fn(ep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"config": name, "device": str(dev), "precision": prec, "per_s": round(steps * batch / dt, 2),
           "unit": "tasks/s" if method == "maml" else "episodes/s"}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() // 2 ** 20
    return out


def run_ours(name: str, steps: int, data: str, device: str) -> dict:
    cmd = [sys.executable, str(HERE / "gpu.py"), "--worker", name, "--steps", str(steps), "--data", data,
           "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"config": name, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def peer_available() -> bool:
    """Whether the peers' environment exists here and its torch sees a GPU."""
    if not PEERS_PYTHON.exists():
        return False
    p = subprocess.run([str(PEERS_PYTHON), "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    return p.returncode == 0 and p.stdout.strip() == "True"


def run_peer(what: str, steps: int, data: str) -> dict:
    p = subprocess.run([str(PEERS_PYTHON), str(HERE / "peers" / "gpu_peers.py"), what, str(steps), data],
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    ap.add_argument("--quick", action="store_true", help="2 steps each: check the script, measure nothing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.data, a.device)))
        return
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; nothing measured (use --device cpu --quick to check the script)")
        return
    steps = 2 if a.quick else a.steps
    names = [n for n in a.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"gpu.py: unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    gpu = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu (smoke run)"
    print(f"machine: {machine()}; device {gpu}", flush=True)
    results = {}
    for n in names:
        results[n] = run_ours(n, steps, a.data, a.device)
        print(json.dumps(results[n]), flush=True)
    peers = {}
    if a.device.startswith("cuda") and peer_available():
        for key in ("protonet-conv4", "maml-conv4-2nd", "maml-conv4-1st"):
            peers[key] = run_peer(key, steps, a.data)
    rows = []
    for n in names:
        r = results[n]
        if "error" in r:
            rows.append([n, "failed: " + r["error"][:60], "", ""])
            continue
        key = "protonet-conv4" if n.startswith("protonet-conv4") else \
            ("maml-conv4-1st" if n.endswith("1st") else "maml-conv4-2nd") if n.startswith("maml") else None
        peer = peers.get(key) if key else None
        rate = None if not peer or "error" in peer else peer.get("episodes_per_s") or peer.get("tasks_per_s")
        ratio = f"{r['per_s'] / rate:.2f}x" if rate else ("peer failed" if peer else "no peer here")
        rows.append([n, f"{r['per_s']} {r['unit']}", str(r.get("peak_gpu_mb", "")), ratio])
    for k, p in peers.items():
        rate = p.get("episodes_per_s") or p.get("tasks_per_s") if "error" not in p else None
        rows.append([f"peer: {k}", f"{rate}" if rate else "failed: " + p.get("error", "")[:60],
                     str(p.get("peak_gpu_mb", "")), "1.00x" if rate else ""])
    print()
    print(table(rows, ["configuration", "speed (median)", "peak GPU MB", "vs peer (same run)"]))


if __name__ == "__main__":
    main()
