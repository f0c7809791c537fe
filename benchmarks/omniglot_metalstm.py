"""Meta-LSTM learner (Ravi & Larochelle 2017) on the Omniglot minimal background sets.

Trains ``metalstm`` on every alphabet of images_background_small1/2 except Korean and Tagalog (rotations as
new classes, 28x28), 5-way ``--shots``-shot 15-query episodes, for at most ``--minutes``, then reports 5-way
1-shot and 5-way 5-shot accuracy +- 95% CI over ``--test-episodes`` fixed-seed episodes of the 57 Korean and
Tagalog characters (both with the one trained model; T = ``--test-steps`` learner updates at test time,
default the training T). The settings are those of the foundation split used by benchmarks/omniglot_gbml.py.

usage: python benchmarks/omniglot_metalstm.py [--minutes 55] [--shots 1] [--inner-steps 12]
       [--out runs/bench_omniglot_metalstm]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import OMNIGLOT, ROOT, evaluate_settings, fit_fresh, table

import fewshot as fs

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_omniglot_metalstm"))
    ap.add_argument("--minutes", type=float, default=55.0, help="training time limit")
    ap.add_argument("--episodes", type=int, default=100000, help="at most this many meta-steps")
    ap.add_argument("--batch", type=int, default=4, help="tasks per meta-step")
    ap.add_argument("--hidden", type=int, default=32, help="learner conv channels (the paper: 32)")
    ap.add_argument("--shots", type=int, default=1, help="training shots (the test reports 1 and 5 shots)")
    ap.add_argument("--inner-steps", type=int, default=12,
                    help="T during training (the paper: 12 for 1-shot, 5 for 5-shot)")
    ap.add_argument("--test-steps", type=int, default=0, help="T at test time (0: --inner-steps)")
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--test-shots", default="1,5", help="comma-separated shots of the 5-way test settings")
    a = ap.parse_args()
    cfg = fs.RunConfig(method="metalstm", data=a.data, size=28, split="group:Korean,Tagalog", val_fraction=0.0,
                       rotations=True, ways=5, shots=a.shots, queries=15, batch=a.batch, test_ways=5, test_shots=1,
                       test_queries=15,
                       options={"hidden": a.hidden, "inner_steps": a.inner_steps, "test_steps": a.test_steps})
    cfg.train.episodes, cfg.train.time_limit_s, cfg.train.lr = a.episodes, a.minutes * 60, 1e-3
    cfg.train.schedule, cfg.train.grad_clip, cfg.train.val_every = "none", 0.25, 0
    cfg.train.ckpt_every, cfg.train.log_every = 50, 5
    run, wall = fit_fresh(cfg, Path(a.out))
    train_s, steps = run.train_result.train_time_s, run.train_result.steps
    print(f"trained {steps} meta-steps of {cfg.batch} tasks: {train_s / 60:.1f} min of training "
          f"({wall / 60:.1f} min wall)", flush=True)
    settings = [(5, int(k)) for k in a.test_shots.split(",") if k]
    rows = [[f"{w}-way {k}-shot", f"{r.mean:.2f} ± {r.ci95:.2f}", r.n, f"{sec:.0f}"]
            for w, k, r, sec in evaluate_settings(run, settings, a.test_episodes)]
    print()
    o = run.method.config
    print(f"metalstm: conv4 {o.hidden} ch (bn {o.bn}), {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query, "
          f"meta-batch {cfg.batch}, T = {o.inner_steps} (test {o.test_steps or o.inner_steps}), {steps} meta-steps, "
          f"precision {run.precision}, training {train_s / 60:.1f} min")
    print(table(rows, ["test (Korean + Tagalog, 57 classes)", "fewshot metalstm (%)", "episodes", "eval s"]))


if __name__ == "__main__":
    main()
