"""Meta-RL on Bernoulli bandits (k = 5 and 10 arms, n = 100 pulls): total reward per episode on held-out
arm distributions, MAML-RL against the classical policies computed exactly (Gittins index, Thompson
sampling, UCB1, greedy, random) on the same tasks, the best of them printed beside.

The policy is an MLP on the episode's sufficient statistics (each arm's successes and failures and the
pull number, over n, and each arm's posterior mean and count-based uncertainty: see
:class:`fewshot.rl.envs.BernoulliBandit`), so it can learn within an episode as the classical policies do;
MAML meta-trains it
(and its adaptation across episodes: one policy-gradient step on ``--shots`` episodes of the task, then a
fresh episode). Reported: the return of the meta-trained policy before adaptation (a learned bandit
algorithm, RL^2-like) and after one step. Rows train for ``--minutes`` each (or exactly ``--steps``
meta-steps) in their own process, with Adam on the policy-gradient meta-objective or, with ``--outer trpo``,
the trust-region outer step of :mod:`fewshot.rl.trpo` (exact Fisher-vector products, KL 0.01; row keys
``bandit-kK-trpo``).

usage: python benchmarks/rl_bandits.py [--minutes 10 | --steps N] [--arms 5,10] [--outer gradient|trpo] [--tasks 1000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_budget_options, add_row_options, budget_args, drive_rows, exit_if_failed, set_budget, table

LR = 3e-3          # the outer Adam rate of the rows (rows recorded before --lr existed used it)
TRPO = {"outer": "trpo", "max_kl": 0.01, "exact_fisher": True}


def row_key(arms: int, outer: str) -> str:
    return f"bandit-k{arms}" + ("-trpo" if outer == "trpo" else "")


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    from fewshot import tasks
    from fewshot.rl.meta import evaluate_adaptation
    from fewshot.run import FAMILY_SEEDS
    k, trpo = int(key.split("-")[1][1:]), key.endswith("-trpo")
    cfg = fs.RunConfig(method="maml", data=f"bandit:k={k},n=100", shots=10, queries=10, batch=10, seed=0,
                       options={"backbone": "mlp", "mlp_hidden": [64, 64], "bn": "none", "inner_lr": 0.1,
                                "discount": 1.0, **(TRPO if trpo else {})})
    cfg.train.lr, cfg.train.schedule, cfg.train.val_every, cfg.train.ckpt_every = a.lr, "none", 0, 50
    set_budget(cfg.train, a, 10 ** 6)
    cfg.val_shots = cfg.val_queries = cfg.test_shots = cfg.test_queries = 10
    run = fs.fit(cfg, Path(a.out) / key, progress=False, overwrite=True)
    fam = tasks.make(cfg.data, 10, 10, seed=FAMILY_SEEDS["test"])
    ret = evaluate_adaptation(run.method, fam, a.tasks, (0, 1), rollouts=10)
    row = {"key": key, "arms": k, "outer": "trpo" if trpo else "adam", "lr": a.lr, "steps": run.train_result.steps,
           "train_s": round(run.train_result.train_time_s),
           "maml": {str(s): v for s, v in ret.items()}}
    print(json.dumps(row), flush=True)
    return row


def classical(k: int, n_tasks: int) -> dict:
    """The classical policies on the same held-out arm distributions as the learned rows."""
    from fewshot import tasks
    from fewshot.rl import compare
    from fewshot.run import FAMILY_SEEDS
    fam = tasks.make(f"bandit:k={k},n=100", 10, 10, seed=FAMILY_SEEDS["test"])
    fam.generator.manual_seed(fam.seed)
    arms = fam.env.sample_tasks(n_tasks, fam.generator)
    return compare(fam.env, arms, rollouts=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_budget_options(ap, minutes=10, unit="meta-steps")
    ap.add_argument("--arms", default="5,10")
    ap.add_argument("--outer", default="gradient", choices=("gradient", "trpo"))
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=LR, help="outer Adam rate (with --outer gradient)")
    add_row_options(ap, out="/tmp/fewshot-rl-bandits")
    a = ap.parse_args()
    keys = [row_key(int(k), a.outer) for k in a.arms.split(",")]
    driven = drive_rows(__file__, a, keys, run_row, [*budget_args(a), "--tasks", str(a.tasks), "--lr", str(a.lr)])
    if driven is None:
        return
    results, failed = driven
    for r in results.latest(keys):
        res = classical(r["arms"], a.tasks)
        outer = ", TRPO outer step" if r.get("outer") == "trpo" else f", Adam {r.get('lr', LR):g}"
        rows = [[f"MAML-RL policy{outer}, before adaptation ({r['steps']} meta-steps in {r['train_s'] / 60:.1f} min)",
                 "%.2f ± %.2f" % tuple(r["maml"]["0"])],
                ["MAML-RL policy, after one step on 10 episodes", "%.2f ± %.2f" % tuple(r["maml"]["1"])]]
        best = max((n for n in res if n != "oracle"), key=lambda n: res[n][0])
        rows += [[n + (" (best classical)" if n == best else ""), f"{m:.2f} ± {c:.2f}"] for n, (m, c) in res.items()]
        print(f"\n# Bernoulli bandit, k = {r['arms']}, n = 100: total reward per episode, {a.tasks} held-out "
              "tasks (mean ± 95% CI over tasks)")
        print(table(rows, ["policy", "total reward"]))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
