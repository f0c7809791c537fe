"""The LSTM optimiser (Andrychowicz et al. 2016) against SGD, Adam and RMSprop with tuned learning rates.

For each optimisee family (random quadratics ||W theta - y||^2, 10-D; with --mlp also a 20-unit sigmoid MLP
on a toy 2-D 4-class data set, see fewshot.learned_optim):

1. meta-trains a coordinate-wise 2-layer, 20-unit LSTM optimiser by truncated BPTT (unroll 20 steps of a
   ``--horizon`` 100-step trajectory, Adam on the LSTM's weights) on freshly drawn training problems;
2. tunes each baseline's learning rate by grid search (10^-4 .. 10, a third of a decade apart) on a fixed set
   of training problems, by the mean loss after ``--horizon`` steps;
3. runs every optimiser on ``--test-problems`` held-out problems (another seed) for ``--horizon`` steps and
   prints the final loss (mean +- 95% CI over problems) and writes the mean loss curves to a PNG.

usage: python benchmarks/lstm_optimizer.py [--iterations 150] [--mlp | --problems mlp] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import ROOT, machine, table

import fewshot.learned_optim as lo

TEST_SEED = 1_000_003


def experiment(kind: str, a) -> tuple:
    """Meta-train, tune, evaluate one family; returns (rows, curves {name: [T+1] mean}, summary line)."""
    make = lo.problem_factory(kind, a.batch)
    torch.manual_seed(a.seed)
    net = lo.LSTMOptimizer()
    t0 = time.time()
    hist = lo.meta_train(net, make, a.iterations, unroll=a.unroll, horizon=a.horizon, lr=a.meta_lr, seed=a.seed,
                         log=lambda i, v: print(f"  [{kind}] iteration {i + 1}/{a.iterations}: meta-loss {v:.4g}",
                                                flush=True) if (i + 1) % max(1, a.iterations // 10) == 0 else None)
    train_s = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), a.out / f"lstm_optimizer_{kind}.pt")
    t0 = time.time()
    tuned = {name: lo.tune_baseline(name, lo.problem_factory(kind, a.tune_problems), a.horizon, seed=a.seed)[0]
             for name in lo.BASELINES}
    tune_s = time.time() - t0
    test = lo.problem_factory(kind, a.test_problems)(torch.Generator().manual_seed(TEST_SEED))
    curves = {"LSTM": lo.run_learned(net, test, a.horizon)}
    for name, lr in tuned.items():
        curves[name] = lo.run_baseline(name, lr, test, a.horizon)
    rows, finals = [], {}
    for name, c in curves.items():
        m, ci = lo.mean_ci(c[-1])
        finals[name] = m
        lr = "learned" if name == "LSTM" else f"{tuned[name]:.3g}"
        rows.append([name, lr, f"{m:.4g} ± {ci:.2g}", f"{float(c[-1].median()):.4g}"])
    best = min((n for n in finals if n != "LSTM"), key=lambda n: finals[n])
    verdict = "beats" if finals["LSTM"] < finals[best] else "does not beat"
    summary = (f"{kind}: LSTM optimiser {verdict} the best tuned baseline ({best}) at step {a.horizon}: "
               f"{finals['LSTM']:.4g} vs {finals[best]:.4g}; meta-training {a.iterations} iterations x "
               f"{a.batch} problems in {train_s:.0f} s (final meta-loss {hist[-1]:.4g}), tuning {tune_s:.0f} s")
    return rows, {n: c.mean(1) for n, c in curves.items()}, summary


def plot(results: dict, a) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (kind, curves) in zip(axes[0], results.items()):
        for name, c in curves.items():
            ax.plot(range(len(c)), c.tolist(), label=name, lw=2.2 if name == "LSTM" else 1.4)
        ax.set_yscale("log")
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("mean loss over held-out problems")
        ax.set_title(f"{kind}: {a.test_problems} held-out problems")
        ax.legend()
    fig.tight_layout()
    out = a.out / "lstm_optimizer_curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=150, help="meta-training iterations (fresh problems each)")
    ap.add_argument("--batch", type=int, default=64, help="problems per meta-training iteration")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=100)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--tune-problems", type=int, default=128)
    ap.add_argument("--test-problems", type=int, default=500)
    ap.add_argument("--mlp", action="store_true", help="also run the MLP-on-toy-data family")
    ap.add_argument("--problems", default="quadratic", help="comma-separated families: quadratic, mlp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_lstm_optimizer")
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    results, summaries = {}, []
    kinds = [k for k in a.problems.split(",") if k] + (["mlp"] if a.mlp else [])
    for kind in dict.fromkeys(kinds):
        rows, curves, summary = experiment(kind, a)
        results[kind] = curves
        summaries.append(summary)
        print()
        print(table(rows, [f"{kind} (step {a.horizon})", "lr", f"final loss (mean ± 95% CI, n={a.test_problems})",
                           "median"]))
        print(summary, flush=True)
    print(f"\ncurves: {plot(results, a)}")


if __name__ == "__main__":
    main()
