"""Siamese network class-split experiment: train on part of the classes, test on the rest.

For each data set (glyphs, and the Omniglot minimal background sets in ../shared/data/omniglot) and each
class split (90-10 and 50-50 by default), trains the Siamese network with the contrastive loss ("classic")
for a fixed time budget (--minutes of training steps), calibrates the same/different threshold on training
pairs (done by fit), then reports on the held-out classes:

- binary accuracy: same/different at the calibrated threshold on --pairs balanced pairs,
- triplet accuracy: share of --pairs triplets with d(a, p) < d(a, n),
- one-shot accuracy: 5-way and 20-way 1-shot (15 queries), nearest support image, --episodes episodes,

all with 95% CIs, as a markdown table. --reptile adds a Reptile-over-class-domains row per data set and
split (--inner-steps SGD steps at --inner-lr per domain, meta step --meta-lr as the trainer's SGD rate).
Reference (CIFAR-100, ResNet, 10 000 iterations; METHODS.md): classic 90-10 triplet 88.34 / binary 80.95 /
few-shot 83.06; Reptile 90-10 73.44 / 67.60 / 68.80.

usage: python benchmarks/siamese_splits.py [--minutes 2 | --steps N] [--data glyphs omniglot] [--splits 90-10 50-50]
                                           [--reptile] [--out runs/bench_siamese]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import OMNIGLOT, ROOT, fit_fresh, table

import fewshot as fs
from fewshot.run import pair_metrics, test_classes

DATA = {"glyphs": "glyphs", "omniglot": str(OMNIGLOT)}


def run_one(a, data: str, split: str, training: str) -> list:
    cfg = fs.RunConfig(method="siamese", data=DATA[data], size=a.size, split=split, val_fraction=0,
                       ways=a.ways, shots=1, queries=a.queries, batch=1, seed=a.seed,
                       options={"loss": "contrastive", "train": training, "calibration_pairs": a.pairs})
    if a.steps:                                      # a fixed number of steps (independent of machine load)
        cfg.train.episodes = a.steps
    else:
        cfg.train.episodes = 10 ** 7                 # the time budget stops training
        cfg.train.time_limit_s = a.minutes * 60
    cfg.train.val_every = 0
    cfg.train.ckpt_every = 10 ** 7
    cfg.train.schedule = "none"
    if training == "reptile":
        cfg.options.update(inner_steps=a.inner_steps, inner_lr=a.inner_lr)
        cfg.train.optimizer, cfg.train.lr = "sgd", a.meta_lr
    run, wall = fit_fresh(cfg, Path(a.out) / f"{data}-{split}-{training}")
    res = run.train_result
    pm = pair_metrics(run, pairs=a.pairs, seed=0)
    shots = {}
    for ways in (5, 20):
        n_test = len(test_classes(run))
        if n_test < ways:
            shots[ways] = f"n/a ({n_test} classes)"
            continue
        r = fs.evaluate_run(run, ways=ways, shots=1, queries=15, episodes=a.episodes, progress=False)
        shots[ways] = f"{r.mean:.2f} ± {r.ci95:.2f}"
    row = [data, split, training, res.steps, f"{res.train_time_s / 60:.1f}",
           f"{pm['binary_acc']:.2f} ± {pm['binary_ci95']:.2f}", f"{pm['threshold']:.3f}",
           f"{pm['triplet_acc']:.2f} ± {pm['triplet_ci95']:.2f}", shots[5], shots[20]]
    print(" | ".join(str(c) for c in row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["glyphs", "omniglot"], choices=sorted(DATA))
    ap.add_argument("--splits", nargs="+", default=["90-10", "50-50"], choices=["90-10", "80-20", "50-50"])
    ap.add_argument("--minutes", type=float, default=2.0, help="training time per run (default: 2)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--reptile", action="store_true", help="also train with Reptile over class domains")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--ways", type=int, default=20, help="classes per training episode (pairs come from them)")
    ap.add_argument("--queries", type=int, default=4, help="images per class per episode beyond the first")
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--inner-lr", type=float, default=1e-3)
    ap.add_argument("--meta-lr", type=float, default=0.01, help="Reptile meta step epsilon (outer SGD)")
    ap.add_argument("--pairs", type=int, default=2000, help="pairs/triplets for calibration and test metrics")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per one-shot setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_siamese"))
    a = ap.parse_args()
    rows = []
    for data in a.data:
        for split in a.splits:
            for training in ["classic"] + (["reptile"] if a.reptile else []):
                rows.append(run_one(a, data, split, training))
    print()
    print(f"Siamese network, contrastive loss (margin 1), {a.ways}-way {1 + a.queries}-image training episodes, "
          + (f"{a.steps} training steps" if a.steps else f"{a.minutes:g} min of training") +
          f" per run, size {a.size}; binary/triplet on {a.pairs} held-out pairs/"
          f"triplets, one-shot on {a.episodes} episodes (15 queries); 95% CIs")
    print(table(rows, ["data", "split", "training", "steps", "train min", "binary acc (%)", "threshold",
                       "triplet acc (%)", "5-way 1-shot (%)", "20-way 1-shot (%)"]))


if __name__ == "__main__":
    main()
