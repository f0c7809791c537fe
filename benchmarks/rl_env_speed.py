"""Environment steps per second of the vectorised RL task families (CPU), and the bandit baselines.

Navigation: ``B`` goals x ``R`` rollouts x 100 steps with a linear-Gaussian policy (what a meta-RL inner
loop samples), one Python step per time step for all ``B x R`` robots; the same with a plain per-task
Python loop (one task's ``R`` rollouts at a time) for comparison; one MAML-RL meta-iteration with every task
at once against the same algorithm run one task at a time. Bandits: the classical policies'
cumulative reward on held-out arm distributions (k = 5 and 10, n = 100), the best printed beside.

usage: python benchmarks/rl_env_speed.py [--tasks 1000] [--rollouts 40] [--bandit-tasks 1000]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import ROOT, machine, table

from fewshot import tasks
from fewshot.rl import BernoulliBandit, Navigation2D, compare, rollout


def nav_speed(tasks: int, rollouts: int, per_task: bool, repeats: int = 3) -> float:
    nav = Navigation2D()
    g = torch.Generator().manual_seed(0)
    goals = nav.sample_tasks(tasks, g)
    W = torch.randn(2, 2, generator=g) * 0.1

    def policy(obs, t):
        mean = obs @ W
        return mean + 0.1 * torch.randn(mean.shape, generator=g)

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if per_task:
            for i in range(tasks):
                rollout(nav, {"goal": goals["goal"][i:i + 1]}, policy, rollouts, g)
        else:
            rollout(nav, goals, policy, rollouts, g)
        best = min(best, time.perf_counter() - t0)
    return tasks * rollouts * nav.horizon / best


def meta_iteration_time(batch: int, rollouts: int, per_task: bool, repeats: int = 2) -> float:
    """Seconds for one MAML-RL meta-gradient on navigation (``batch`` goals x ``rollouts`` rollouts, the
    recipe's policy): every task at once, or the same algorithm one task at a time (gradients summed)."""
    import fewshot as fs
    cfg = fs.RunConfig.load(ROOT / "recipes" / "maml_navigation.yaml")
    fam = tasks.make("navigation2d", rollouts, rollouts, batch=batch, seed=0)
    torch.manual_seed(0)
    m = fs.methods.build("maml", fam.in_shape, outputs=fam.outputs, **cfg.options)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if per_task:
            for _ in range(batch):
                loss, _ = m.loss(fam.sample(1))
                (loss / batch).backward()
        else:
            loss, _ = m.loss(fam.sample())
            loss.backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rollouts", type=int, default=40)
    ap.add_argument("--bandit-tasks", type=int, default=1000)
    ap.add_argument("--bandit-rollouts", type=int, default=10)
    a = ap.parse_args()
    print(f"# {machine()}")
    rows = [["navigation2d, all tasks at once", a.tasks, a.rollouts, f"{nav_speed(a.tasks, a.rollouts, False):,.0f}"],
            ["navigation2d, loop over tasks", a.tasks // 10, a.rollouts,
             f"{nav_speed(a.tasks // 10, a.rollouts, True, repeats=1):,.0f}"]]
    print(table(rows, ["rollout", "tasks", "rollouts", "env steps/s"]))
    vec, loop = meta_iteration_time(20, 20, False), meta_iteration_time(20, 20, True)
    print("\n# MAML-RL meta-iteration on navigation (20 goals x 20 rollouts x 100 steps, before and after one "
          "inner step; recipes/maml_navigation.yaml)")
    print(table([["all tasks at once (fewshot)", f"{vec:.2f}", "1.00"],
                 ["the same algorithm, one task at a time", f"{loop:.2f}", f"{loop / vec:.2f}"]],
                ["meta-iteration", "seconds", "x the vectorised time"]))
    for k in (5, 10):
        bandit = BernoulliBandit(k, 100)
        tasks = bandit.sample_tasks(a.bandit_tasks, torch.Generator().manual_seed(2_000_003))
        res = compare(bandit, tasks, a.bandit_rollouts)
        best = max((v for n, v in res.items() if n != "oracle"), key=lambda v: v[0])
        name = [n for n, v in res.items() if v is best][0]
        print(f"\n# Bernoulli bandit k={k}, n=100: total reward per episode, {a.bandit_tasks} held-out tasks x "
              f"{a.bandit_rollouts} episodes (mean ± 95% CI over tasks); best baseline: {name}")
        print(table([[n, f"{m:.2f} ± {c:.2f}"] for n, (m, c) in res.items()], ["policy", "total reward"]))


if __name__ == "__main__":
    main()
