"""The copy task (Graves et al. 2014): neural Turing machine vs a stacked-LSTM baseline of similar size.

Trains ``ntm`` and ``lstm`` on copy sequences of lengths 1..20 (the methods' literature recipe: RMSprop lr 1e-4,
momentum 0.9, gradient components clipped to +-10; batches of 16 sequences) for the same time budget each,
then reports bits wrong per sequence +- 95% CI over fixed-seed held-out sequences of length 10 and 20 (seen
in training) and 30 and 40 (longer than any training sequence: generalisation), the parameter counts, the
training steps and the training time.

usage: python benchmarks/copy_task.py [--minutes 60] [--sequences 1000] [--out runs/bench_copy]
       (add e.g. --lr 3e-4 or --batch 8 to change the recipe for both models)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ROOT, fit_fresh, table

import fewshot as fs
from fewshot import methods

MODELS = ("ntm", "lstm")
LENGTHS = (10, 20, 30, 40)


def config(method: str, a) -> fs.RunConfig:
    cfg = fs.RunConfig(method=method)
    defaults = methods.get(method).run_defaults
    for k, v in defaults.items():
        if k != "train":
            setattr(cfg, k, v)
    for k, v in defaults["train"].items():
        setattr(cfg.train, k, v)
    cfg.data = f"copy:{a.min_length}-{a.max_length}"
    cfg.train.time_limit_s = a.minutes * 60
    cfg.train.episodes = a.max_steps
    cfg.train.val_every = 0             # no validation: all the budget goes to training; last = best
    cfg.train.ckpt_every = 10 ** 9
    cfg.test_episodes = a.sequences
    cfg.device, cfg.seed = a.device, a.seed
    if a.lr is not None:
        cfg.train.lr = a.lr
    if a.batch is not None:
        cfg.batch = a.batch
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="training time budget per model")
    ap.add_argument("--max-steps", type=int, default=10 ** 7, help="stop a model earlier after this many steps")
    ap.add_argument("--sequences", type=int, default=1000, help="held-out sequences per length")
    ap.add_argument("--min-length", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: these models are small and step-bound; more threads only "
                         "add overhead, and much more so on a busy machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_copy"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lengths = sorted(set(LENGTHS) | {a.max_length, 2 * a.max_length})
    rows, summary = [], []
    for method in a.models.split(","):
        cfg = config(method, a)
        run, wall = fit_fresh(cfg, Path(a.out) / method)
        res = run.train_result
        n_params = run.method.parameter_count()
        cells = []
        for L in lengths:
            r = fs.evaluate_run(run, data=f"copy:{L}", episodes=a.sequences, progress=False)
            cells.append(f"{r.mean:.2f} ± {r.ci95:.2f}")
            print(f"{method} length {L}: {r}", flush=True)
        rows.append([method, f"{n_params:,}", *cells, res.steps, f"{res.train_time_s / 60:.1f}"])
        summary.append(f"{method}: {res.steps} steps of {cfg.batch} sequences ({res.steps * cfg.batch:,} "
                       f"sequences) in {res.train_time_s / 60:.1f} min of training ({wall / 60:.1f} min wall), "
                       f"{cfg.train.optimizer} lr {cfg.train.lr:g} momentum {cfg.train.momentum:g}, "
                       f"clip {cfg.train.grad_clip_value:g}, precision {run.precision}, device {run.device}")
    print()
    print("\n".join(summary))
    seen = f"{a.min_length}-{a.max_length}"
    heads = [f"L={L}" + (" (seen)" if a.min_length <= L <= a.max_length else " (longer)") for L in lengths]
    print(f"bits wrong per sequence ± 95% CI ({a.sequences} held-out sequences per length; trained on "
          f"lengths {seen})")
    print(table(rows, ["model", "parameters", *heads, "steps", "train min"]))


if __name__ == "__main__":
    main()
