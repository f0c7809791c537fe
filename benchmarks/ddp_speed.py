"""Meta-training speed of 2 torch.distributed ranks (gloo) against one process, on this machine's cores.

Each configuration is a real ``fewshot train`` run in its own process tree, on the built-in glyphs data
(28x28, generated, no download), Conv-4 with 64 channels, 5-way 1-shot tasks with ``--queries`` queries per
class, the same global batch of ``--batch`` tasks per step, the precision and layout ``auto`` picks here:

- ``1 process x T threads``: one process, ``OMP_NUM_THREADS=T`` (T = the cores), the reference; for MAML
  with its per-task loop in that one process (``--workers 1``) and, as the existing way to use the cores,
  split over one single-threaded worker process per core (``--workers`` auto, :mod:`fewshot.parallel`);
- ``1 process x 1 thread``: what one rank alone does, so the ranks' own gain shows apart from the cost of
  intra-op threads (which on cores shared with other jobs wait on each other);
- ``N ranks x 1 thread``: ``fewshot train ... --nproc N`` (torch.distributed.run, one thread per rank).

Tasks per second come from rank 0's ``metrics.jsonl``: training time (``elapsed_s``, validation excluded)
between the first logged step and the last, so start-up (imports, data, rendezvous) and the first steps are
left out. Rounds alternate the configurations (``--repeats``), and the median round is reported, since the
cores are shared with whatever else runs.

usage: python benchmarks/ddp_speed.py [--steps 30] [--batch 4] [--queries 5] [--repeats 2]
       [--methods protonet,maml]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, table


def configs(method: str, cores: int) -> list:
    """(label, threads, extra flags) of each configuration of ``method``; the first is the reference."""
    loop = ["--workers", "1"] if method == "maml" else []
    out = [(f"1 process x {cores} threads" + (", --workers 1" if loop else ""), cores, loop),
           ("1 process x 1 thread" + (", --workers 1" if loop else ""), 1, loop)]
    if method == "maml":
        out.append((f"1 process x {cores} threads, --workers {cores} (task pool)", cores, []))
    out.append((f"{cores} ranks x 1 thread (--nproc {cores})", 1, ["--nproc", str(cores)]))
    return out


def run(method: str, threads: int, extra: list, steps: int, batch: int, queries: int, out: Path) -> float:
    """Tasks per second of one training run (rank 0's training time between its first and last log row)."""
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "fewshot", "train", method, "--data", "glyphs", "--ways", "5", "--shots", "1",
            "--queries", str(queries), "--batch", str(batch), "--episodes", str(steps), "--val-every", "0",
            "--log-every", "5", "--no-eval", "--no-progress", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    res = subprocess.run(args, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{method} {' '.join(extra)} failed:\n{res.stderr[-2000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    first, last = rows[0], rows[-1]
    return batch * (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    ap.add_argument("--batch", type=int, default=4, help="global batch of tasks per step")
    ap.add_argument("--queries", type=int, default=5, help="queries per class")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the configurations")
    ap.add_argument("--methods", default="protonet,maml")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="ranks / threads to use")
    a = ap.parse_args()
    print(machine())
    print(f"5-way 1-shot {a.queries}-query, global batch {a.batch}, {a.steps} steps per run, {a.repeats} rounds")
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().split()[:3]}")
    work = Path(tempfile.mkdtemp(prefix="ddp_speed-"))
    rows = []
    for method in a.methods.split(","):
        speeds = {label: [] for label, _, _ in configs(method, a.cores)}
        for r in range(a.repeats):
            for label, threads, extra in configs(method, a.cores):
                v = run(method, threads, extra, a.steps, a.batch, a.queries, work / "run")
                speeds[label].append(v)
                print(f"round {r + 1}: {method} {label}: {v:.1f} tasks/s", flush=True)
        base = statistics.median(next(iter(speeds.values())))
        for label, vs in speeds.items():
            m = statistics.median(vs)
            rows.append([method, label, f"{m:.1f}", " ".join(f"{v:.1f}" for v in vs), f"{m / base:.2f}x"])
    with open("/proc/loadavg") as f:
        print(f"load after: {f.read().split()[:3]}")
    print(table(rows, ["method", "configuration", "tasks/s (median)", "rounds", "vs 1 process"]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
