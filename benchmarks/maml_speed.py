"""MAML meta-training speed on Omniglot 5-way 1-shot (CPU): ours against learn2learn in the same run.

Configuration (the issue's): Conv-4 with 64 channels and batch norm, 15 queries per class, meta-batch 32,
one inner step with inner lr 0.4, Adam outer step; the small background alphabets (except Korean and
Tagalog) with rotations. Every configuration runs in its own process so its peak resident memory
(``ru_maxrss``, the whole process) is its own:

- ours: second and first order; the per-task loop in one process and split over one single-threaded
  process per core (``workers``, the default on CPU), and vmap; in the precision/layout a run picks on
  this machine (``auto``: bf16 autocast + channels-last on a CPU with AMX) and in fp32 NCHW;
- learn2learn 0.2.0's MAML via ``../shared/anchors/anchor_maml_l2l.py`` (second and first order), when the
  peers' virtual environment exists (``../shared/anchors/setup_anchor_venv.sh``).

usage: python benchmarks/maml_speed.py [--iters 6] [--configs loop-auto,...] [--no-peer]
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

from common import ANCHORS, OMNIGLOT, PEERS_PYTHON, TEST_ALPHABETS, machine, table

HERE = Path(__file__).resolve().parent
CONFIGS = {
    # name: (vectorize, first_order, precision, channels_last, chunk, workers)
    "loop-auto-2nd": ("loop", False, "auto", "auto", 0, 0),
    "loop-auto-1st": ("loop", True, "auto", "auto", 0, 0),
    "loop1-auto-2nd": ("loop", False, "auto", "auto", 0, 1),
    "loop1-auto-1st": ("loop", True, "auto", "auto", 0, 1),
    "loop1-fp32-2nd": ("loop", False, "fp32", False, 0, 1),
    "loop1-fp32-1st": ("loop", True, "fp32", False, 0, 1),
    "vmap8-auto-2nd": ("vmap", False, "auto", False, 8, 1),
    "vmap8-auto-1st": ("vmap", True, "auto", False, 8, 1),
}


def worker(name: str, iters: int, data: str, device: str, warmup: int = 2) -> dict:
    import fewshot as fs
    from fewshot.models import set_channels_last
    from fewshot.precision import autocast, resolve_channels_last, resolve_device, resolve_precision
    vec, first, prec, cl, chunk, workers = CONFIGS[name]
    dev = resolve_device(device)
    prec = resolve_precision(prec, dev)
    cl = resolve_channels_last(cl, dev)
    ds = fs.data.omniglot(data, split="small")
    train, _ = ds.split_by_group(TEST_ALPHABETS)
    train = train.with_rotations()
    sampler = fs.episodes(train, 5, 1, 15, batch=32, seed=0, device=dev)
    torch.manual_seed(0)
    m = fs.methods.build("maml", train.image_shape, outputs=5, inner_lr=0.4, inner_steps=1, first_order=first,
                         vectorize=vec, chunk=chunk, workers=workers).to(dev)
    set_channels_last(m, cl)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    acc = 0.0
    for i in range(warmup + iters):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
        ep = sampler.sample()
        with autocast(dev, prec):
            loss, metrics = m.loss(ep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = metrics["acc"]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    pool = m.__dict__.get("_pool")
    n_procs = 1 + (pool.workers if pool is not None else 0)
    if pool is not None:
        pool.close()            # waits for the workers, so their peak RSS is counted in RUSAGE_CHILDREN
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    out = {"config": name, "processes": n_procs, "device": str(dev), "precision": prec, "channels_last": cl, "vectorize": vec,
           "order": "first" if first else "second", "tasks_per_s": round(iters * 32 / dt, 2),
           # peak resident memory of the main process plus (largest worker's peak) x (number of workers)
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + children * (n_procs - 1),
           "last_train_acc": acc}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() // 2 ** 20
    return out


def run_ours(name: str, iters: int, data: str, device: str) -> dict:
    cmd = [sys.executable, str(HERE / "maml_speed.py"), "--worker", name, "--iters", str(iters), "--data", data,
           "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"config": name, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_peer(iters: int, first: bool) -> dict | None:
    script = ANCHORS / "anchor_maml_l2l.py"
    if not PEERS_PYTHON.exists() or not script.exists():
        return None
    env = dict(os.environ, FIRST="1" if first else "0")
    p = subprocess.run([str(PEERS_PYTHON), script.name, str(iters)], cwd=ANCHORS, capture_output=True, text=True,
                       env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"config": "learn2learn", "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=6, help="timed meta-iterations per configuration")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.iters, a.data, a.device)))
        return
    print(f"# MAML Omniglot 5w1s15q, meta-batch 32, 1 inner step (lr 0.4), Conv-4 64ch + BN; {machine()}")
    results, peers = [], {}
    names = [n for n in a.configs.split(",") if n]
    for order in ("second", "first"):
        if not a.no_peer and a.device == "cpu":
            peers[order] = run_peer(a.iters, order == "first")
        for n in names:
            if (CONFIGS[n][1] and order == "first") or (not CONFIGS[n][1] and order == "second"):
                results.append(run_ours(n, a.iters, a.data, a.device))
    rows = []
    for order in ("second", "first"):
        peer = peers.get(order)
        if peer and "tasks_per_s" in peer:
            rows.append([f"learn2learn 0.2.0 ({order} order)", "cpu", "fp32", "loop", peer["tasks_per_s"],
                         peer["peak_rss_mb"], "1.00"])
        for r in results:
            if r.get("order") != order and "error" not in r:
                continue
            if "error" in r:
                if (CONFIGS[r["config"]][1]) == (order == "first"):
                    rows.append([r["config"], "", "", "", "error: " + r["error"][:60], "", ""])
                continue
            ratio = f"{r['tasks_per_s'] / peer['tasks_per_s']:.2f}" if peer and "tasks_per_s" in peer else "-"
            mem = r["peak_rss_mb"] if "peak_gpu_mb" not in r else f"{r['peak_rss_mb']} (GPU {r['peak_gpu_mb']})"
            layout = "channels-last" if r["channels_last"] else "NCHW"
            how = (f"loop, {r['processes']} process" + ("es" if r["processes"] > 1 else "")) \
                if r["vectorize"] == "loop" else f"vmap, chunk {CONFIGS[r['config']][4]}"
            rows.append([f"fewshot maml ({order} order)", r["device"], f"{r['precision']} {layout}", how,
                         r["tasks_per_s"], mem, ratio])
    print(table(rows, ["implementation", "device", "precision", "task axis", "tasks/s", "peak RSS MB (all processes)",
                       "× learn2learn (same run)"]))


if __name__ == "__main__":
    main()
