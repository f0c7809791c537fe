"""Meta-RL on 2-D navigation (the MAML paper's Fig. 4): return on held-out goals after 0-3 policy-gradient
steps, for MAML, Meta-SGD and a policy pretrained on all training goals (the same inner step at test),
beside a random policy, the best possible return (the clipped straight line to the goal), and, as in the
paper, an oracle *policy*: the same network given the goal as input (``navigation2d:goal=1``), trained on all
goals by the same outer step.

Every learned row trains with ``recipes/maml_navigation.yaml``'s settings (the ``-trpo`` rows with
``recipes/maml_navigation_trpo.yaml``'s trust-region outer step, the ``-2step`` rows with
``recipes/maml_navigation_2step.yaml``'s two inner steps) for the same wall-clock budget
(``--minutes``), or the same number of meta-steps (``--steps``), in its own process (``--jobs`` at a time,
``--threads`` each), then adapts on the same 100 held-out goals (seed 2 000 003, 20 rollouts per step) with
fresh rollouts after every step. Rows append to ``--results`` (JSON lines) as they finish; a rerun skips rows
already there unless ``--fresh``.

usage: python benchmarks/rl_navigation.py [--minutes 15] [--rows maml,metasgd,pretrained] [--goals 100]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (ROOT, add_budget_options, add_row_options, budget_args, drive_rows, exit_if_failed,
                    set_budget, table)

STEPS = (0, 1, 2, 3)
PRETRAINED = {"inner_steps": 0, "test_steps": 1}
ORACLE = {"inner_steps": 0}
ADAM, TRPO, TWO = "maml_navigation", "maml_navigation_trpo", "maml_navigation_2step"
ROWS = {   # key: (label, method, options, recipe, data (None: the recipe's))
    "maml": ("MAML (second order)", "maml", {}, ADAM, None),
    "metasgd": ("Meta-SGD", "metasgd", {}, ADAM, None),
    "pretrained": ("pretrained on all goals, fine-tuned", "maml", PRETRAINED, ADAM, None),
    # meta-trained for two inner steps (each on fresh rollouts), tested after 0-3 as every row
    "maml-2step": ("MAML (second order), meta-trained for 2 steps", "maml", {}, TWO, None),
    "metasgd-2step": ("Meta-SGD, meta-trained for 2 steps", "metasgd", {}, TWO, None),
    # the same rows with the trust-region outer step (fewshot.rl.trpo) instead of Adam
    "maml-trpo": ("MAML (second order), TRPO outer step", "maml", {}, TRPO, None),
    "metasgd-trpo": ("Meta-SGD, TRPO outer step", "metasgd", {}, TRPO, None),
    "pretrained-trpo": ("pretrained, TRPO, fine-tuned", "maml", PRETRAINED, TRPO, None),
    # the MAML paper's oracle: the same policy network given the goal as input, trained on all goals and
    # validated without adaptation (a fine-tuning step only spoils a policy that already knows the goal)
    "oracle-policy": ("oracle policy (sees the goal)", "maml", ORACLE, ADAM, "navigation2d:goal=1"),
    "oracle-policy-trpo": ("oracle policy (sees the goal), TRPO", "maml", ORACLE, TRPO, "navigation2d:goal=1"),
}


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    from fewshot import tasks
    from fewshot.rl.meta import evaluate_adaptation
    from fewshot.run import FAMILY_SEEDS
    label, method, options, recipe, data = ROWS[key]
    cfg = fs.RunConfig.load(ROOT / "recipes" / f"{recipe}.yaml")
    cfg.method, cfg.data = method, data or cfg.data
    cfg.options = {**cfg.options, **options}
    set_budget(cfg.train, a, 10 ** 6)
    run = fs.fit(cfg, Path(a.out) / key, progress=False, overwrite=True)
    res = run.train_result
    fam = tasks.make(cfg.data, cfg.test_shots, cfg.test_queries, seed=FAMILY_SEEDS["test"])
    t = time.time()
    ret = evaluate_adaptation(run.method, fam, a.goals, STEPS, rollouts=cfg.test_shots)
    row = {"key": key, "label": label, "steps": res.steps, "train_s": round(res.train_time_s, 1),
           "eval_s": round(time.time() - t, 1), "returns": {str(k): v for k, v in ret.items()}}
    print(json.dumps(row), flush=True)
    return row


def reference_rows(goals: int) -> list:
    """Random uniform velocities and the best possible return, on the same held-out goals."""
    import torch
    from fewshot import tasks
    from fewshot.evaluate import mean_ci
    from fewshot.rl import rollout
    from fewshot.run import FAMILY_SEEDS
    fam = tasks.make("navigation2d", 20, 20, seed=FAMILY_SEEDS["test"])
    env = fam.env
    goal = env.sample_tasks(goals, fam.generator)
    g = torch.Generator().manual_seed(0)
    rand = rollout(env, goal, lambda obs, t: 0.2 * torch.rand(obs.shape, generator=g) - 0.1, 20, g)
    r = mean_ci(rand.returns.mean(1).double().tolist())
    o = mean_ci(env.optimal_return(goal).double().tolist())
    return [["random (uniform velocity)", "-", *(f"{r[0]:.2f} ± {r[1]:.2f}" for _ in STEPS)],
            ["best possible (straight to the goal)", "-", *(f"{o[0]:.2f} ± {o[1]:.2f}" for _ in STEPS)]]


def main() -> None:
    ap = argparse.ArgumentParser()
    add_budget_options(ap, minutes=15, unit="meta-steps")
    ap.add_argument("--rows", default="maml,metasgd,pretrained", help=f"of {','.join(ROWS)}")
    ap.add_argument("--goals", type=int, default=100)
    add_row_options(ap, out="/tmp/fewshot-rl-navigation")
    a = ap.parse_args()
    keys = a.rows.split(",")
    driven = drive_rows(__file__, a, keys, run_row, [*budget_args(a), "--goals", str(a.goals)])
    if driven is None:
        return
    results, failed = driven
    rows = []
    for r in results.latest(keys):
        cells = [f"{m:.2f} ± {c:.2f}" for m, c in (r["returns"][str(k)] for k in STEPS)]
        if ROWS[r["key"]][2] is ORACLE:        # the paper's oracle does not adapt (its K > 0 are in rows.jsonl)
            cells = [cells[0]] + ["-"] * (len(STEPS) - 1)
        rows.append([r["label"], f"{r['steps']} in {r['train_s'] / 60:.1f} min", *cells])
    rows += reference_rows(a.goals)
    print(f"\n# 2-D navigation, {a.goals} held-out goals, return after K policy-gradient steps (20 rollouts "
          "per step; mean ± 95% CI over goals)")
    print(table(rows, ["policy", "meta-steps", *(f"K = {k}" for k in STEPS)]))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
