"""One-shot imitation on 2-D reaching: MIL (MAML with the behaviour-cloning loss) against behaviour cloning
of all demonstrations and a demonstration-conditioned (contextual) policy, for the same training
time (or steps).

Every row trains with ``recipes/mil_reach.yaml``'s data and schedule for ``--minutes`` (or exactly
``--steps`` steps) in its own process (``--jobs`` at a time, ``--threads`` each), then acts in closed loop on
the same ``--tasks`` held-out tasks (seed 2 000 003) after seeing one demonstration; success = within 0.05
of the demonstrated target for the last 10 of 20 steps. Rows append to ``--results`` as they finish; a rerun
skips finished rows unless ``--fresh``.

usage: python benchmarks/imitation_reach.py [--minutes 10] [--rows mil,bc,contextual] [--tasks 1000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import (ROOT, add_budget_options, add_row_options, budget_args, drive_rows, exit_if_failed,
                    set_budget, table)

ROWS = {   # key: (label, method, options)
    "mil": ("MIL: MAML, behaviour-cloning loss, 1 step", "maml", {}),
    "bc": ("behaviour cloning of all demonstrations", "maml", {"inner_steps": 0}),
    "contextual": ("demonstration-conditioned policy", "contextual", {"hidden": [100, 100], "context": 100,
                                                                     "loss": "bc"}),
}


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    label, method, options = ROWS[key]
    cfg = fs.RunConfig.load(ROOT / "recipes" / "mil_reach.yaml")
    cfg.method = method
    cfg.options = options if method != "maml" else {**cfg.options, **options}
    set_budget(cfg.train, a, cfg.train.episodes)
    run = fs.fit(cfg, Path(a.out) / key, progress=False, overwrite=True)
    res = fs.evaluate_run(run, episodes=a.tasks, progress=False)
    row = {"key": key, "label": label, "steps": run.train_result.steps, "train_s": round(run.train_result.train_time_s),
           "best_step": run.checkpoint.get("step"), "success": [res.mean, res.ci95]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    add_budget_options(ap, minutes=10)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--tasks", type=int, default=1000)
    add_row_options(ap, out="/tmp/fewshot-imitation")
    a = ap.parse_args()
    keys = a.rows.split(",")
    driven = drive_rows(__file__, a, keys, run_row, [*budget_args(a), "--tasks", str(a.tasks)])
    if driven is None:
        return
    results, failed = driven
    rows = [[r["label"], f"{r['steps']} in {r['train_s'] / 60:.1f} min (best at {r['best_step']})",
             f"{r['success'][0]:.1f} ± {r['success'][1]:.1f}"] for r in results.latest(keys)]
    print(f"\n# 2-D reaching, one demonstration, closed-loop success on {a.tasks} held-out tasks (% ± 95% CI)")
    print(table(rows, ["policy", "training steps", "success %"]))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
