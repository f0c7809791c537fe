"""One-shot imitation of human handwriting (Omniglot pen strokes): draw a new character after seeing one
drawer's demonstration, scored by the mean time-aligned distance to the character's other 19 drawers
(canvas units, the 105-pixel canvas spans 2; lower is better).

Training characters: the small background sets' alphabets except Korean and Tagalog; test: the 57 Korean
and Tagalog characters (1000 fixed-seed tasks: a character and a demonstrating drawer). Rows train with the
trainer for ``--minutes`` (or exactly ``--steps`` steps) each in their own process; the nearest-neighbour
answer, the demonstration itself, is scored on the same tasks.

usage: python benchmarks/strokes_imitation.py [--minutes 10] [--rows maml,metasgd,contextual,bc] [--tasks 1000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import (OMNIGLOT, TEST_ALPHABETS, add_budget_options, add_row_options, budget_args, drive_rows,
                    exit_if_failed, set_budget, table)

MLP = {"backbone": "mlp", "mlp_hidden": [100, 100], "bn": "none", "loss": "mse"}
ROWS = {   # key: (label, method, options)
    "maml": ("MAML, 1 step (lr 0.1)", "maml", {**MLP, "inner_lr": 0.1}),
    "metasgd": ("Meta-SGD, 1 step", "metasgd", {**MLP, "inner_lr": 0.1}),
    "contextual": ("demonstration-conditioned policy", "contextual", {"hidden": [100, 100], "context": 100,
                                                                     "loss": "mse"}),
    "bc": ("behaviour cloning of all demonstrations", "maml", {**MLP, "inner_steps": 0}),
}


def _families(points: int):
    from fewshot.data.strokes import load_strokes
    from fewshot.tasks.imitation import StrokeTasks
    st = load_strokes(OMNIGLOT, points=points)
    return (StrokeTasks(st.select(exclude=TEST_ALPHABETS), batch=10, seed=0),
            StrokeTasks(st.select(groups=TEST_ALPHABETS), seed=2_000_003))


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    label, method, options = ROWS[key]
    train, test = _families(a.points)
    torch.manual_seed(0)
    m = fs.methods.build(method, train.in_shape, outputs=2, **options)
    cfg = fs.TrainConfig(lr=1e-3, schedule="none", val_every=0, ckpt_every=10 ** 6, log_every=100)
    set_budget(cfg, a, 10 ** 7)
    res = fs.train(m, train, cfg, Path(a.out) / key, progress=False)
    r = fs.evaluate(m, test, a.tasks, progress=False)
    row = {"key": key, "label": label, "steps": res.steps, "train_s": round(res.train_time_s),
           "distance": [r.mean, r.ci95]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    add_budget_options(ap, minutes=10)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--points", type=int, default=50)
    add_row_options(ap, out="/tmp/fewshot-strokes")
    a = ap.parse_args()
    keys = a.rows.split(",")
    driven = drive_rows(__file__, a, keys, run_row, [*budget_args(a), "--tasks", str(a.tasks),
                                                      "--points", str(a.points)])
    if driven is None:
        return
    results, failed = driven
    from fewshot.evaluate import EVAL_BATCH, mean_ci
    _, test = _families(a.points)
    test.generator.manual_seed(test.seed)
    copy = []
    while len(copy) < a.tasks:             # the evaluator's draws: batches of tasks from the reset seed
        copy.extend(test.copy_baseline(test.sample(EVAL_BATCH)).tolist())
    cm, cc, _ = mean_ci(copy[:a.tasks])
    rows = [[r["label"], f"{r['steps']} in {r['train_s'] / 60:.1f} min", f"{r['distance'][0]:.3f} ± {r['distance'][1]:.3f}"]
            for r in results.latest(keys)]
    rows.append(["nearest neighbour: the demonstration itself", "-", f"{cm:.3f} ± {cc:.3f}"])
    print(f"\n# Omniglot strokes, one demonstration, {a.tasks} held-out tasks ({'+'.join(TEST_ALPHABETS)}): mean "
          "distance of the drawing to the other drawers (± 95% CI; lower is better)")
    print(table(rows, ["policy", "training", "distance"]))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
