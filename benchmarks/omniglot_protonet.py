"""Prototypical network on the Omniglot minimal background sets, tested on alphabets never seen.

Trains on every alphabet of images_background_small1/2 except Korean and Tagalog (with 90/180/270-degree
rotations as new classes) using recipes/protonet_omniglot_small.yaml, then reports 5-way 1-shot, 5-way
5-shot, 20-way 1-shot and 20-way 5-shot accuracy +- 95% CI over 1000 fixed-seed episodes of the 57 Korean
and Tagalog characters, and the training time. Each setting is scored twice: plain (one forward pass per
image) and with the recipe's test-time augmentation (`tta` copies of every support and query image,
fewshot.tta); training is the same for both.

usage: python benchmarks/omniglot_protonet.py [--recipe recipes/X.yaml] [--out runs/bench] [--episodes N]
       python benchmarks/omniglot_protonet.py --eval-only [--out runs/bench]   (re-test a trained run)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import OMNIGLOT, ROOT, evaluate_settings, fit_fresh, load_trained, table

import fewshot as fs

SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]
EASYFSL = {(5, 1): "96.69 ± 0.27", (5, 5): "99.34 ± 0.09", (20, 1): "89.70 ± 0.21", (20, 5): "97.32 ± 0.08"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "protonet_omniglot_small.yaml"))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_omniglot_protonet"))
    ap.add_argument("--episodes", type=int, default=None, help="override the recipe's training episodes")
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--tta", type=int, default=None,
                    help="test-time augmentation copies (default: the recipe's; 0: plain scores only)")
    ap.add_argument("--eval-only", action="store_true", help="test the run already trained in --out")
    a = ap.parse_args()
    recipe_cfg = fs.RunConfig.load(a.recipe)
    if a.eval_only:
        run, steps, train_s = load_trained(Path(a.out))
        cfg = run.config
    else:
        cfg = recipe_cfg
        cfg.data = a.data
        if a.episodes:
            cfg.train.episodes = a.episodes
        run, wall = fit_fresh(cfg, Path(a.out))
        train_s, steps = run.train_result.train_time_s, run.train_result.steps
        print(f"trained {steps} steps: {train_s / 60:.1f} min of training steps "
              f"({wall / 60:.1f} min wall including data loading and validation)", flush=True)
    tta = recipe_cfg.tta if a.tta is None else a.tta
    plain = evaluate_settings(run, SETTINGS, a.test_episodes, tta=0)
    augmented = evaluate_settings(run, SETTINGS, a.test_episodes, tta=tta) if tta else []
    rows = []
    for i, (w, k, r, _) in enumerate(plain):
        rows.append([f"{w}-way {k}-shot", f"{r.mean:.2f} ± {r.ci95:.2f}"]
                    + ([f"{augmented[i][2].mean:.2f} ± {augmented[i][2].ci95:.2f}"] if tta else [])
                    + [r.n, EASYFSL[(w, k)]])
    print()
    print(f"recipe {Path(a.recipe).name}: {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query, "
          f"{steps} episodes, precision {cfg.precision}, channels_last {cfg.channels_last}, "
          f"training {train_s / 60:.1f} min")
    print(table(rows, ["test (Korean + Tagalog, 57 classes)", "fewshot protonet (%)"]
                + ([f"with test-time augmentation x{tta} (%)"] if tta else [])
                + ["episodes", "easyfsl 1.5.0, 2000 ep, 19 min (%)"]))


if __name__ == "__main__":
    main()
