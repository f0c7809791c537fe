"""Gradient-based methods on the Omniglot minimal background sets, tested on alphabets never seen.

Trains METHOD with recipes/METHOD_omniglot_small.yaml (every alphabet of images_background_small1/2 except
Korean and Tagalog, with rotations; a time budget of at most 60 minutes), then reports 5-way 1-shot and
5-way 5-shot accuracy +- 95% CI over 1000 fixed-seed episodes of the 57 Korean and Tagalog characters
(the 5-shot row uses the same 1-shot-trained model), and the training time.

usage: python benchmarks/omniglot_gbml.py maml [--minutes 55] [--out runs/bench_omniglot_maml]
       python benchmarks/omniglot_gbml.py maml --eval-only [--test-steps S]   (re-test the run in --out,
       e.g. after `fewshot train --resume --out runs/bench_omniglot_maml --time-limit-s 3600`)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import OMNIGLOT, ROOT, evaluate_settings, fit_fresh, load_trained, table

import fewshot as fs

SETTINGS = [(5, 1), (5, 5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("--recipe", default=None, help="default: recipes/METHOD_omniglot_small.yaml")
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--out", default=None)
    ap.add_argument("--minutes", type=float, default=None, help="override the recipe's training time limit")
    ap.add_argument("--episodes", type=int, default=None,
                    help="override the recipe's meta-step count (a linear schedule anneals over it)")
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--test-steps", type=int, default=None,
                    help="inner steps at test time (default: the recipe's test_steps)")
    ap.add_argument("--eval-only", action="store_true", help="test the run already trained in --out")
    a = ap.parse_args()
    recipe = a.recipe or str(ROOT / "recipes" / f"{a.method}_omniglot_small.yaml")
    out = Path(a.out or ROOT / "runs" / f"bench_omniglot_{a.method}")
    recipe_cfg = fs.RunConfig.load(recipe)
    if a.eval_only:
        run, steps, train_s = load_trained(out)
        cfg = run.config
        print(f"testing the run in {out}: {steps} meta-steps of {cfg.batch} tasks, {train_s / 60:.1f} min of "
              "training", flush=True)
    else:
        cfg = recipe_cfg
        cfg.data = a.data
        if a.minutes:
            cfg.train.time_limit_s = a.minutes * 60
        if a.episodes:
            cfg.train.episodes = a.episodes
        run, wall = fit_fresh(cfg, out)
        train_s, steps = run.train_result.train_time_s, run.train_result.steps
        print(f"trained {steps} meta-steps of {cfg.batch} tasks: {train_s / 60:.1f} min of training "
              f"({wall / 60:.1f} min wall)", flush=True)
    test_steps = a.test_steps if a.test_steps is not None else recipe_cfg.options.get("test_steps")
    if test_steps is not None and hasattr(run.method.config, "test_steps"):
        norms = run.method.net.norm_layers()
        kept = norms[0].running_mean.shape[0] - 1 if run.method.config.bn == "running" and norms else None
        if kept is not None and int(test_steps) > kept:                  # statistics of steps 0..kept
            raise SystemExit(f"this run keeps per-step batch-norm statistics for {kept} steps only")
        run.method.config.test_steps = int(test_steps)
    rows = [[f"{w}-way {k}-shot", f"{r.mean:.2f} ± {r.ci95:.2f}", r.n, f"{sec:.0f}"]
            for w, k, r, sec in evaluate_settings(run, SETTINGS, a.test_episodes)]
    print()
    o = run.method.config
    print(f"recipe {Path(recipe).name}: {cfg.method}, {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query, "
          f"meta-batch {cfg.batch}, {o.inner_steps} inner step(s) lr {o.inner_lr} "
          f"(test {o.test_steps or o.inner_steps}), "
          f"bn {o.bn}, {steps} meta-steps, precision {cfg.precision}, channels_last {cfg.channels_last}, "
          f"training {train_s / 60:.1f} min")
    print(table(rows, ["test (Korean + Tagalog, 57 classes)", f"fewshot {cfg.method} (%)", "episodes",
                       "eval s"]))


if __name__ == "__main__":
    main()
