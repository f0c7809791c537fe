"""Siamese network class-split experiment: train on part of the classes, test on the rest.

For each data set and each class split (90-10 and 50-50 by default), trains the Siamese network ("classic"
training) for a fixed time budget (--minutes of training steps) or a fixed number of steps (--steps),
calibrates the same/different threshold on training pairs (done by fit), then reports on the held-out
classes:

- binary accuracy: same/different at the calibrated threshold on --pairs balanced pairs,
- triplet accuracy: share of --pairs triplets with d(a, p) < d(a, n),
- one-shot accuracy: N-way 1-shot for N in --eval-ways (default 5 and 20; 15 queries), nearest support
  image, --episodes episodes,

all with 95% CIs, as a markdown table. Data sets (each with its own network, loss and image size unless
--backbone / --loss / --size say otherwise):

- ``glyphs`` and ``omniglot`` (the Omniglot minimal background sets in ../shared/data/omniglot): Conv-4,
  contrastive loss, 28x28 grey;
- ``mini32``, the CIFAR-100 stand-in: all 100 classes x 600 images of mini-ImageNet (--mini, images/ with
  train/val/test.csv) resized to 32x32 RGB, which is CIFAR-100's shape (CIFAR-100 itself cannot be had
  here); the 90-10 / 80-20 / 50-50 splits are seeded random splits of those 100 classes (the Ravi split is
  ignored), the network is the CIFAR ResNet-20 of He et al. 2016 (64-d embedding) and the loss the
  report's triplet loss.

--reptile adds a Reptile-over-class-domains row per data set and split (--inner-steps SGD steps at
--inner-lr per domain, meta step --meta-lr as the trainer's SGD rate; --reptile-steps meta steps).
Reference (CIFAR-100, ResNet, 10 000 iterations; METHODS.md): classic 90-10 triplet 88.34 / binary 80.95 /
few-shot 83.06; Reptile 90-10 73.44 / 67.60 / 68.80.

usage: python benchmarks/siamese_splits.py [--minutes 2 | --steps N] [--data glyphs omniglot mini32]
                                           [--splits 90-10 80-20 50-50] [--reptile] [--reptile-steps N]
                                           [--backbone NAME] [--loss triplet] [--mini DIR] [--out runs/bench_siamese]
e.g. the CIFAR-100 stand-in: python benchmarks/siamese_splits.py --data mini32 --splits 90-10 80-20 50-50 \
         --reptile --steps 500 --reptile-steps 50 --episodes 200 --eval-ways 5 10
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common import OMNIGLOT, ROOT, fit_fresh, table

import fewshot as fs
from fewshot.run import pair_metrics, test_classes


@dataclass(frozen=True)
class DataChoice:
    """One ``--data`` choice: where the classes come from and the network, loss and image size it gets."""

    data: str                       #: RunConfig.data (a built-in name or a path)
    size: int
    backbone: str
    loss: str
    channels: Optional[int] = None  #: None: the data's own


DATA = {
    "glyphs": DataChoice("glyphs", 28, "conv4", "contrastive"),
    "omniglot": DataChoice(str(OMNIGLOT), 28, "conv4", "contrastive"),
    # the CIFAR-100 stand-in (its data path comes from --mini)
    "mini32": DataChoice("", 32, "resnet20", "triplet", channels=3),
}


def choice(a, data: str) -> DataChoice:
    """The data choice with the command line's overrides (--mini, --size, --backbone, --loss)."""
    d = DATA[data]
    return DataChoice(a.mini if data == "mini32" else d.data, a.size or d.size, a.backbone or d.backbone,
                      a.loss or d.loss, d.channels)


def run_one(a, data: str, split: str, training: str) -> list:
    d = choice(a, data)
    cfg = fs.RunConfig(method="siamese", data=d.data, size=d.size, channels=d.channels, split=split,
                       val_fraction=0, ways=a.ways, shots=1, queries=a.queries, batch=1, seed=a.seed,
                       options={"loss": d.loss, "backbone": d.backbone, "train": training,
                                "calibration_pairs": a.pairs})
    steps = a.reptile_steps if training == "reptile" and a.reptile_steps else a.steps
    if steps:                                        # a fixed number of steps (independent of machine load)
        cfg.train.episodes = steps
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
    n_test = len(test_classes(run))
    for ways in a.eval_ways:
        if n_test < ways:
            shots[ways] = f"n/a ({n_test} classes)"
            continue
        r = fs.evaluate_run(run, ways=ways, shots=1, queries=15, episodes=a.episodes, progress=False)
        shots[ways] = f"{r.mean:.2f} ± {r.ci95:.2f}"
    row = [data, d.backbone, d.loss, split, training, res.steps, f"{res.train_time_s / 60:.1f}",
           f"{pm['binary_acc']:.2f} ± {pm['binary_ci95']:.2f}", f"{pm['threshold']:.3f}",
           f"{pm['triplet_acc']:.2f} ± {pm['triplet_ci95']:.2f}", *(shots[w] for w in a.eval_ways)]
    print(" | ".join(str(c) for c in row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["glyphs", "omniglot"], choices=sorted(DATA))
    ap.add_argument("--mini", default="/work/data/mini-imagenet",
                    help="mini-ImageNet for --data mini32 (images/ + train/val/test.csv; all 100 classes are used)")
    ap.add_argument("--splits", nargs="+", default=["90-10", "50-50"], choices=["90-10", "80-20", "50-50"])
    ap.add_argument("--minutes", type=float, default=2.0, help="training time per run (default: 2)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--reptile", action="store_true", help="also train with Reptile over class domains")
    ap.add_argument("--reptile-steps", type=int, default=0,
                    help="meta steps of the Reptile rows (default: --steps; each costs --inner-steps SGD steps)")
    ap.add_argument("--size", type=int, default=0, help="image size (default: the data's: 28, mini32 32)")
    ap.add_argument("--backbone", default="", help="encoder (default: the data's: conv4, mini32 resnet20)")
    ap.add_argument("--loss", default="", choices=["", "contrastive", "triplet"],
                    help="training loss (default: the data's: contrastive, mini32 triplet)")
    ap.add_argument("--ways", type=int, default=20, help="classes per training episode (pairs come from them)")
    ap.add_argument("--queries", type=int, default=4, help="images per class per episode beyond the first")
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--inner-lr", type=float, default=1e-3)
    ap.add_argument("--meta-lr", type=float, default=0.01, help="Reptile meta step epsilon (outer SGD)")
    ap.add_argument("--pairs", type=int, default=2000, help="pairs/triplets for calibration and test metrics")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per one-shot setting")
    ap.add_argument("--eval-ways", type=int, nargs="+", default=[5, 20],
                    help="N of the N-way 1-shot tests (mini32's 90-10 split holds out 10 classes: use 5 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_siamese"))
    a = ap.parse_args()
    rows = []
    for data in a.data:
        for split in a.splits:
            for training in ["classic"] + (["reptile"] if a.reptile else []):
                rows.append(run_one(a, data, split, training))
    print()
    print(f"Siamese network (margin 1), {a.ways}-way {1 + a.queries}-image training episodes, "
          + (f"{a.steps} training steps" if a.steps else f"{a.minutes:g} min of training") + " per run"
          + (f" ({a.reptile_steps} meta steps for Reptile)" if a.reptile and a.reptile_steps else "") +
          f"; binary/triplet on {a.pairs} held-out pairs/"
          f"triplets, one-shot on {a.episodes} episodes (15 queries); 95% CIs")
    print(table(rows, ["data", "backbone", "loss", "split", "training", "steps", "train min", "binary acc (%)",
                       "threshold",
                       "triplet acc (%)", *(f"{w}-way 1-shot (%)" for w in a.eval_ways)]))


if __name__ == "__main__":
    main()
