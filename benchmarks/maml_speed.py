"""MAML meta-training speed on Omniglot 5-way 1-shot (CPU): ours against learn2learn in the same run.

Configuration (the issue's): Conv-4 with 64 channels and batch norm, 15 queries per class, meta-batch 32,
one inner step with inner lr 0.4, Adam outer step; the small background alphabets (except Korean and
Tagalog) with rotations. Every configuration runs in its own process so its peak resident memory
(``ru_maxrss``, the whole process) is its own:

- ours: second and first order; the per-task loop in one process and split over one single-threaded
  process per core (``workers``, the default on CPU), and vmap; in the precision/layout a run picks on
  this machine (``auto``: bf16 autocast + channels-last on a CPU with AMX) and in fp32 NCHW;
- learn2learn 0.2.0's MAML via ``../shared/anchors/anchor_maml_l2l.py`` (second and first order), when the
  peers' virtual environment exists (``../shared/anchors/setup_anchor_venv.sh``), as users run it, and as a
  control with the glibc ``malloc`` settings fewshot's CPU task loop applies to itself
  (``fewshot.parallel.tune_allocator``; the ``-glibc`` configurations of ours run without them).

``--isa avx2`` runs every process (ours and learn2learn's) with ATen, oneDNN and MKL held to AVX2
(``common.ISA_ENV``): an AVX2-only CPU's code paths on a newer part.

usage: python benchmarks/maml_speed.py [--iters 6] [--repeats 3] [--configs loop-auto-2nd,...] [--no-peer]
       [--isa native|avx2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import (ANCHORS, ISA_ENV, OMNIGLOT, PEERS_PYTHON, TEST_ALPHABETS, machine, ratio_summary, table,
                    use_isa)

from fewshot.parallel import MALLOC_ENV     # tune_allocator's settings as glibc environment variables

HERE = Path(__file__).resolve().parent
CONFIGS = {
    # name: (vectorize, first_order, precision, channels_last, chunk, workers, tuned malloc)
    "loop-auto-2nd": ("loop", False, "auto", "auto", 0, 0, True),
    "loop-auto-1st": ("loop", True, "auto", "auto", 0, 0, True),
    "loop-auto-2nd-glibc": ("loop", False, "auto", "auto", 0, 0, False),
    "loop-auto-1st-glibc": ("loop", True, "auto", "auto", 0, 0, False),
    "loop-fp32-cl-2nd": ("loop", False, "fp32", True, 0, 0, True),
    "loop-fp32-cl-1st": ("loop", True, "fp32", True, 0, 0, True),
    "loop-fp32-2nd": ("loop", False, "fp32", False, 0, 0, True),
    "loop-fp32-1st": ("loop", True, "fp32", False, 0, 0, True),
    "loop-bf16-cl-2nd": ("loop", False, "bf16", True, 0, 0, True),
    "loop-bf16-cl-1st": ("loop", True, "bf16", True, 0, 0, True),
    "loop1-auto-2nd": ("loop", False, "auto", "auto", 0, 1, True),
    "loop1-auto-1st": ("loop", True, "auto", "auto", 0, 1, True),
    "loop1-fp32-2nd": ("loop", False, "fp32", False, 0, 1, True),
    "loop1-fp32-1st": ("loop", True, "fp32", False, 0, 1, True),
    "vmap8-auto-2nd": ("vmap", False, "auto", False, 8, 1, True),
    "vmap8-auto-1st": ("vmap", True, "auto", False, 8, 1, True),
}


def worker(name: str, iters: int, data: str, device: str, warmup: int = 2) -> dict:
    import fewshot as fs
    from fewshot.models import set_channels_last
    from fewshot.precision import autocast, resolve_channels_last, resolve_device, resolve_precision
    vec, first, prec, cl, chunk, workers, _ = CONFIGS[name]
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
    env = dict(os.environ, FEWSHOT_TUNE_MALLOC="1" if CONFIGS[name][6] else "0")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"config": name, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_peer(iters: int, first: bool, tuned: bool = False) -> dict | None:
    script = ANCHORS / "anchor_maml_l2l.py"
    if not PEERS_PYTHON.exists() or not script.exists():
        return None
    env = dict(os.environ, FIRST="1" if first else "0", **(MALLOC_ENV if tuned else {}))
    p = subprocess.run([str(PEERS_PYTHON), script.name, str(iters)], cwd=ANCHORS, capture_output=True, text=True,
                       env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"config": "learn2learn", "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def _merge(results: list | None) -> dict | None:
    """One row from several rounds of a configuration: median tasks/s, the largest peak memory."""
    ok = [r for r in results or [] if r and "tasks_per_s" in r]
    if not ok:
        return None
    out = dict(ok[0], tasks_per_s=round(statistics.median(r["tasks_per_s"] for r in ok), 2),
               peak_rss_mb=max(r["peak_rss_mb"] for r in ok))
    if "peak_gpu_mb" in out:
        out["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in ok)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=6, help="timed meta-iterations per configuration")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of every configuration, run in turn; the table gives medians (this machine is noisy)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-control", action="store_true", help="skip learn2learn under fewshot's malloc settings")
    ap.add_argument("--isa", choices=list(ISA_ENV), default="native",
                    help="instruction set ATen/oneDNN/MKL may use, for every process of the run (peer included)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    use_isa(a.isa)
    if a.worker:
        print(json.dumps(worker(a.worker, a.iters, a.data, a.device)))
        return
    print(f"# MAML Omniglot 5w1s15q, meta-batch 32, 1 inner step (lr 0.4), Conv-4 64ch + BN; {machine()}; "
          f"median of {a.repeats} rounds")
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    runs: dict = {}          # (order, key) -> one result per round; key: "peer", "control" or a config name

    def record(key, r, rnd):
        runs.setdefault(key, []).append(r)
        print(f"# round {rnd + 1}, {key[0]} order, {key[1]}: " + json.dumps(r), flush=True)

    for rnd in range(a.repeats):
        for order in ("second", "first"):
            if not a.no_peer and a.device == "cpu":
                record((order, "peer"), run_peer(a.iters, order == "first"), rnd)
                if not a.no_control:
                    record((order, "control"), run_peer(a.iters, order == "first", tuned=True), rnd)
            for n in names:
                if CONFIGS[n][1] == (order == "first"):
                    record((order, n), run_ours(n, a.iters, a.data, a.device), rnd)
    rows = []
    for order in ("second", "first"):
        peer = _merge(runs.get((order, "peer")))

        def versus(key):
            """Median over rounds of the ratio to the peer's run of the same round, and its range."""
            if not peer:
                return "-"
            r = [o["tasks_per_s"] / p["tasks_per_s"] for o, p in zip(runs[(order, key)], runs[(order, "peer")])
                 if o and p and "tasks_per_s" in o and "tasks_per_s" in p]
            return ratio_summary(r) if r else "-"

        if peer:
            rows.append([f"learn2learn 0.2.0 ({order} order)", "cpu", "fp32", "loop", peer["tasks_per_s"],
                         peer["peak_rss_mb"], "1.00"])
            ctl = _merge(runs.get((order, "control")))
            if ctl:
                rows.append([f"learn2learn 0.2.0 ({order} order)", "cpu", "fp32", "loop, fewshot's malloc settings",
                             ctl["tasks_per_s"], ctl["peak_rss_mb"], versus("control")])
        for n in names:
            if CONFIGS[n][1] != (order == "first"):
                continue
            r = _merge(runs[(order, n)])
            if r is None:
                err = next((x["error"] for x in runs[(order, n)] if x and "error" in x), "failed")
                rows.append([n, "", "", "", "error: " + err[:60], "", ""])
                continue
            mem = r["peak_rss_mb"] if "peak_gpu_mb" not in r else f"{r['peak_rss_mb']} (GPU {r['peak_gpu_mb']})"
            layout = "channels-last" if r["channels_last"] else "NCHW"
            how = (f"loop, {r['processes']} process" + ("es" if r["processes"] > 1 else "")) \
                if r["vectorize"] == "loop" else f"vmap, chunk {CONFIGS[n][4]}"
            if not CONFIGS[n][6]:
                how += ", glibc malloc defaults"
            rows.append([f"fewshot maml ({order} order)", r["device"], f"{r['precision']} {layout}", how,
                         r["tasks_per_s"], mem, versus(n)])
    print(table(rows, ["implementation", "device", "precision", "task axis", "tasks/s (median)",
                       "peak RSS MB (all processes)", "× learn2learn (same round; range)"]))


if __name__ == "__main__":
    main()
