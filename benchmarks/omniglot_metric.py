"""Every metric-based method on the Omniglot minimal background sets, tested on alphabets never seen.

Each row trains one method for the same wall-clock budget (``--minutes``) on every alphabet of
images_background_small1/2 except Korean and Tagalog (with rotations as new classes, the affine jitter and
within-alphabet tasks of recipes/protonet_omniglot_small.yaml), then reports 5-way 1-shot, 5-way 5-shot and
20-way 1-shot accuracy +- 95% CI over 1000 fixed-seed episodes of the 57 Korean and Tagalog characters, and
its training time and steps. The prototypical network trained for the same time is the reference each row
is compared with.

Rows run as separate processes, ``--jobs`` at a time, each with ``--threads`` torch threads, so rows run
under the same conditions (the default, 2 jobs x 1 thread, fills this 2-core machine). Results are appended
to ``--results`` (JSON lines) as rows finish; a rerun skips rows already there unless ``--fresh``.

usage: python benchmarks/omniglot_metric.py [--minutes 3] [--rows protonet,matching,...] [--jobs 2]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from common import OMNIGLOT, ROOT, RowResults, exit_if_failed, machine, run_row_processes, table

#: 20 drawings per Omniglot character: semi-supervised rows hold 5 unlabelled images per way, so their test
#: episodes have 10 queries per way instead of 15 (1 + 10 + 5 and 5 + 10 + 5 images fit in 20).
ROWS = {
    "protonet": ("prototypical (squared Euclidean)", "protonet", {}, {}),
    "protonet-cosine": ("prototypical (cosine)", "protonet", {"distance": "cosine", "learn_scale": True,
                                                              "scale": 10.0}, {}),
    "protonet-dot": ("prototypical (dot)", "protonet", {"distance": "dot"}, {}),
    "matching": ("matching", "matching", {}, {"ways": 20, "shots": 5, "queries": 5}),
    "matching-fce": ("matching + FCE", "matching", {"fce": True}, {"ways": 20, "shots": 5, "queries": 5}),
    "relation": ("relation", "relation", {}, {"ways": 20, "shots": 1, "queries": 10}),
    "relation-mean": ("relation (mean of the K support maps)", "relation", {"shot_pooling": "mean"},
                      {"ways": 20, "shots": 1, "queries": 10}),
    "siamese": ("Siamese (contrastive, classic)", "siamese", {}, {"ways": 20, "shots": 5, "queries": 5}),
    "siamese-reptile": ("Siamese (triplet, Reptile over domains)", "siamese",
                        {"train": "reptile", "loss": "triplet", "inner_steps": 5, "inner_lr": 0.05},
                        {"ways": 20, "shots": 5, "queries": 5, "train.optimizer": "sgd", "train.lr": 1.0,
                         "train.schedule": "none"}),
    "gaussian": ("Gaussian prototypical (radius)", "gaussian", {}, {}),
    "semisup": ("semi-supervised (5 unlabelled, 0 distractors)", "semisup", {},
                {"ways": 20, "shots": 5, "queries": 5, "unlabeled": 5, "distractors": 0}),
    "semisup-distractors": ("semi-supervised (5 unlabelled, 5 distractor classes)", "semisup",
                            {"mode": "distractor"},
                            {"ways": 20, "shots": 5, "queries": 5, "unlabeled": 5, "distractors": 5}),
    "hallucinate-0": ("hallucination M=0", "hallucinate", {"m": 0}, {"ways": 20, "shots": 1, "queries": 10}),
    "hallucinate-10": ("hallucination M=10", "hallucinate", {"m": 10}, {"ways": 20, "shots": 1, "queries": 10}),
    "hallucinate-50": ("hallucination M=50", "hallucinate", {"m": 50}, {"ways": 20, "shots": 1, "queries": 10}),
    "taskcond": ("task-conditioned", "taskcond", {}, {}),
}
SETTINGS = [(5, 1), (5, 5), (20, 1)]


def run_row(key: str, minutes: float, data: str, out_root: Path, episodes: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    import fewshot as fs
    label, method, options, overrides = ROWS[key]
    cfg = fs.RunConfig.load(ROOT / "recipes" / "protonet_omniglot_small.yaml")
    cfg.method, cfg.options, cfg.data = method, copy.deepcopy(options), data
    for k, v in overrides.items():
        if k.startswith("train."):
            setattr(cfg.train, k[len("train."):], v)
        else:
            setattr(cfg, k, v)
    cfg.train.time_limit_s = minutes * 60
    cfg.train.episodes = 10 ** 7
    cfg.train.ckpt_every = 10 ** 7
    out = out_root / key
    t0 = time.time()
    run = fs.fit(cfg, out, progress=False, overwrite=True)
    res = run.train_result
    row = {"key": key, "label": label, "method": method, "options": options, "overrides": overrides,
           "train_s": res.train_time_s, "steps": res.steps, "wall_s": time.time() - t0, "threads": threads,
           "machine": machine(), "results": {}}
    queries = 10 if cfg.unlabeled else 15
    for w, k in SETTINGS:
        r = fs.evaluate_run(run, ways=w, shots=k, queries=queries, episodes=episodes, progress=False)
        row["results"][f"{w}w{k}s"] = {"mean": r.mean, "ci95": r.ci95, "n": r.n, "queries": queries,
                                       "mode": r.mode}
    return row


def render(rows: list) -> str:
    ref = next((r for r in rows if r["key"] == "protonet"), None)
    body = []
    for r in rows:
        cells = [r["label"], f"{r['train_s'] / 60:.1f} min / {r['steps']}"]
        for w, k in SETTINGS:
            x = r["results"][f"{w}w{k}s"]
            cells.append(f"{x['mean']:.2f} ± {x['ci95']:.2f}" + ("" if x["queries"] == 15 else f" ({x['queries']}q)"))
        if ref is not None and r is not ref:
            worse = [f"{w}w{k}s" for w, k in SETTINGS
                     if r["results"][f"{w}w{k}s"]["mean"] + r["results"][f"{w}w{k}s"]["ci95"]
                     < ref["results"][f"{w}w{k}s"]["mean"] - ref["results"][f"{w}w{k}s"]["ci95"]]
            cells.append("below protonet: " + ", ".join(worse) if worse else "not below protonet")
        else:
            cells.append("reference")
        body.append(cells)
    return table(body, ["method", "training (time / steps)", "5-way 1-shot", "5-way 5-shot", "20-way 1-shot",
                        "vs prototypical, same time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget of every row")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys: " + ", ".join(ROWS))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_metric"))
    ap.add_argument("--results", default=None, help="JSON lines file (default: OUT/results.jsonl)")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    ap.add_argument("--jobs", type=int, default=2, help="rows trained at the same time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per row")
    ap.add_argument("--fresh", action="store_true", help="rerun the selected rows even if the results file has them")
    ap.add_argument("--row", help=argparse.SUPPRESS)   # internal: run one row in this process
    a = ap.parse_args()
    out = Path(a.out)
    results = RowResults(a.results or out / "results.jsonl")
    if a.row:
        results.append(run_row(a.row, a.minutes, a.data, out, a.episodes, a.threads))
        return
    keys = [k for k in a.rows.split(",") if k]
    bad = [k for k in keys if k not in ROWS]
    if bad:
        sys.exit(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    out.mkdir(parents=True, exist_ok=True)
    if a.fresh:                            # forget the selected rows' earlier results (keep the others)
        results.forget(keys)
    todo = results.pending(keys)
    print(f"machine: {machine()}; {len(todo)} row(s) to train, {a.jobs} at a time, {a.threads} thread(s) "
          f"each, {a.minutes} min each", flush=True)
    row_args = ["--minutes", str(a.minutes), "--data", a.data, "--out", str(out), "--results", str(results.path),
                "--episodes", str(a.episodes), "--threads", str(a.threads)]
    failed = run_row_processes(__file__, todo, row_args, out, a.jobs, a.threads)
    rows = results.latest(list(ROWS))
    print()
    print(f"Omniglot small background sets, test alphabets Korean + Tagalog (57 classes), {a.episodes} test "
          f"episodes per setting; every row trained {a.minutes} min, {a.jobs} rows at a time x "
          f"{a.threads} thread(s)")
    print(render(rows))
    exit_if_failed(failed, out)


if __name__ == "__main__":
    main()
