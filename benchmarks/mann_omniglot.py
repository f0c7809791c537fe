"""MANN (LRU access, Santoro et al. 2016) next to its LSTM baseline on Omniglot characters never seen.

Rows train for the same wall-clock budget (``--minutes``) or number of steps (``--steps``) on the episode
protocol of the paper: sequences of 5 classes x 10 drawings (50 steps; the image at step t comes with the
label of step t-1, labels shuffled per sequence) from every alphabet of images_background_small1/2 except
Korean and Tagalog, images downscaled to 20x20 and flattened, rotations by multiples of 90 degrees as new
training classes. Then each reports accuracy by instance number (the k-th time a class appears in its
sequence; 1st, 2nd, 3rd, 5th, 10th) +- 95% CI over ``--episodes`` fixed-seed sequences of the 57 Korean
and Tagalog characters, with the paper's figures (trained for 100 000 episodes) as a reference.

Rows run as separate processes, ``--jobs`` at a time with ``--threads`` torch threads each (the default
2 x 1 fills this 2-core machine), so both train under the same conditions. Results are appended to
``--results`` (JSON lines) as rows finish; a rerun skips rows already there unless ``--fresh``.

Rows: ``mann`` (the default model: separate add vector, learned read strength), ``mann-paper`` (the
paper's letter: the key is written, read strength 1), ``lstm`` (the baseline).

usage: python benchmarks/mann_omniglot.py [--minutes 20] [--steps N] [--rows mann,lstm] [--episodes 1000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import OMNIGLOT, ROOT, TEST_ALPHABETS, RowResults, exit_if_failed, machine, run_row_processes, table

INSTANCES = (1, 2, 3, 5, 10)
ROWS = {   # key: (label, method, options)
    "mann": ("MANN (LRU, 128 x 40 memory, 4 heads)", "mann", {}),
    "mann-paper": ("MANN, the paper's letter (writes the key, beta = 1)", "mann",
                   {"learn_strength": False, "add_vector": False}),
    "lstm": ("LSTM baseline (same controller)", "mann-lstm", {}),
}
#: Santoro et al. 2016, table 1 (Omniglot, 5 classes, one-hot labels), accuracy in % by instance
PAPER = {"mann": [36.4, 82.8, 91.0, 94.9, 98.1], "lstm": [24.4, 49.5, 55.3, 63.6, 62.5]}


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    from fewshot.run import test_classes
    label, method, options = ROWS[key]
    options = {**options, **(json.loads(a.options) if a.options else {})}
    cfg = fs.RunConfig(method=method, data=a.data, size=a.size, split="group:" + ",".join(TEST_ALPHABETS),
                       val_fraction=0.0, rotations=not a.no_rotations, ways=5, shots=5, queries=5,
                       batch=a.batch, options=options, precision="fp32", seed=a.seed)
    cfg.train.lr, cfg.train.schedule, cfg.train.grad_clip = a.lr, "none", 10.0
    cfg.train.val_every, cfg.train.ckpt_every = 0, 10 ** 7
    cfg.train.time_limit_s = a.minutes * 60
    cfg.train.episodes = a.steps or 10 ** 7
    t0 = time.time()
    run = fs.fit(cfg, Path(a.out) / key, progress=False, overwrite=True)
    res = run.train_result
    test = test_classes(run)
    t1 = time.time()
    inst = run.method.evaluate_instances(test, episodes=a.episodes, ways=5, per_class=10, seed=0,
                                         instances=INSTANCES)
    return {"key": key, "label": label, "method": method, "options": options, "train_s": res.train_time_s,
            "steps": res.steps, "batch": a.batch, "eval_s": time.time() - t1, "wall_s": time.time() - t0,
            "test_classes": len(test), "episodes": a.episodes, "threads": a.threads, "machine": machine(),
            "instances": {str(k): v for k, v in inst.items()}}


def render(rows: list) -> str:
    body = []
    for r in rows:
        cells = [r["label"], f"{r['train_s'] / 60:.1f} min / {r['steps']} x {r['batch']}"]
        cells += [f"{r['instances'][str(k)]['acc']:.1f} ± {r['instances'][str(k)]['ci95']:.1f}" for k in INSTANCES]
        body.append(cells)
    for key, accs in PAPER.items():
        body.append([f"{ROWS[key][0].split(' (')[0].split(',')[0]}: Santoro et al. 2016", "100 000 episodes"]
                    + [f"{v:.1f}" for v in accs])
    return table(body, ["model", "training (time / steps x batch)"] + [f"instance {k}" for k in INSTANCES])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget of each row (0: none)")
    ap.add_argument("--steps", type=int, default=0, help="at most this many training steps (0: no limit)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--size", type=int, default=20, help="image side (the paper: 20)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (the paper: 16)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--options", default="", help='extra method options as JSON, e.g. \'{"learn_strength": true}\'')
    ap.add_argument("--no-rotations", action="store_true", help="no rotated copies as training classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=1000, help="test sequences")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_mann"))
    ap.add_argument("--results", default=None, help="JSON lines file (default: OUT/results.jsonl)")
    ap.add_argument("--jobs", type=int, default=2, help="rows trained at the same time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per row")
    ap.add_argument("--fresh", action="store_true", help="rerun the selected rows even if the results file has them")
    ap.add_argument("--row", help=argparse.SUPPRESS)   # internal: run one row in this process
    a = ap.parse_args()
    out = Path(a.out)
    results = RowResults(a.results or out / "results.jsonl")
    if a.row:
        results.append(run_row(a.row, a))
        return
    keys = [k for k in a.rows.split(",") if k]
    bad = [k for k in keys if k not in ROWS]
    if bad:
        sys.exit(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    if not a.minutes and not a.steps:
        sys.exit("give a budget: --minutes, --steps or both")
    out.mkdir(parents=True, exist_ok=True)
    if a.fresh:                            # forget the selected rows' earlier results (keep the others)
        results.forget(keys)
    todo = results.pending(keys)
    budget = " and ".join(b for b in (f"{a.minutes} min" if a.minutes else "", f"{a.steps} steps" if a.steps else "")
                          if b)
    print(f"machine: {machine()}; {len(todo)} row(s) to train, {a.jobs} at a time, {a.threads} thread(s) "
          f"each, {budget} each", flush=True)
    passed = ["--minutes", str(a.minutes), "--steps", str(a.steps), "--data", a.data, "--size", str(a.size),
              "--batch", str(a.batch), "--lr", str(a.lr), "--options", a.options, "--seed", str(a.seed),
              "--episodes", str(a.episodes), "--out", str(out), "--results", str(results.path),
              "--threads", str(a.threads)]
    if a.no_rotations:
        passed.append("--no-rotations")
    failed = run_row_processes(__file__, todo, passed, out, a.jobs, a.threads)
    rows = results.latest(list(ROWS), keys)
    print()
    print(f"Omniglot small background sets, {a.size}x{a.size} flattened, held-out alphabets "
          f"{' + '.join(TEST_ALPHABETS)}: accuracy (%) by instance number over {a.episodes} sequences of "
          f"5 classes x 10 drawings; this run: {budget} per row (each row shows its own time and steps), "
          f"{a.jobs} rows at a time x {a.threads} thread(s); chance 20%")
    print(render(rows))
    exit_if_failed(failed, out)


if __name__ == "__main__":
    main()
