"""The pretraining stage on the Omniglot minimal background sets, tested on alphabets never seen.

Three rows with the same training-time budget (``--minutes``), one after another, each from
recipes/protonet_omniglot_small.yaml (every alphabet of images_background_small1/2 but Korean and Tagalog,
rotations as new classes, affine jitter, half of the tasks within one alphabet):

- ``protonet``: the recipe's episodic training for the whole budget;
- ``protonet-pretrained``: ``--pretrain-epochs`` of supervised pretraining (fewshot.pretrain: Conv-4 and a
  linear classifier over all training classes, Adam ``--pretrain-lr`` cosine-annealed, the recipe's jitter),
  then the recipe's episodic training for the rest of the budget;
- ``simpleshot``: ``--simpleshot-epochs`` of the same pretraining, then simpleshot's own short episodic
  stage (100 episodes at lr 1e-4, its run_defaults) when it fits in the budget, CL2N nearest centroid.

A pretrained row runs as two ``fit`` calls on one run folder: the first pretrains and meta-trains for 1 s,
the second resumes it with the episodic time limit set to the budget minus the measured pretraining time, so
pretraining + meta-training is the budget (data loading and checkpoint writes are not counted, as in every
row). Then 5-way 1-shot and 20-way 1-shot accuracy +- 95% CI over ``--test-episodes`` fixed-seed episodes
of the 57 Korean and Tagalog characters (15 queries, plain images: no test-time augmentation).

``--tta N`` adds columns scored with N test-time augmentation copies, ``--finetune-steps S`` (``--finetune-lr``)
columns scored with test-time fine-tuning (on ``--finetune-episodes`` episodes: a copy of the network is
adapted per episode, which costs far more than the plain test); the plain column is always there.

``--eval-only`` re-tests the rows already trained in ``--out``; with ``--features L2N`` (or ``UN``) the
simpleshot row's trained backbone is scored with that feature transform instead of CL2N (an ablation with
no retraining: the transforms have no parameters; the centring vector is only used by CL2N).

usage: python benchmarks/pretrain_omniglot.py [--minutes 5] [--rows protonet,protonet-pretrained,simpleshot]
       python benchmarks/pretrain_omniglot.py --eval-only --rows simpleshot --features L2N [--tta 8]
                                              [--finetune-steps 20 --finetune-lr 1e-3]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import OMNIGLOT, ROOT, evaluate_settings, machine, table

import fewshot as fs
from fewshot import checkpoint

SETTINGS = [(5, 1), (20, 1)]
ROWS = ("protonet", "protonet-pretrained", "simpleshot")


def row_config(key: str, recipe: fs.RunConfig, a) -> fs.RunConfig:
    """The recipe as row ``key`` changes it (the budget is set by :func:`train_row`)."""
    cfg = copy.deepcopy(recipe)
    cfg.data, cfg.tta, cfg.pretrain_lr, cfg.pretrain_batch = a.data, 0, a.pretrain_lr, a.pretrain_batch
    if key == "protonet-pretrained":
        cfg.pretrain_epochs = a.pretrain_epochs
    elif key == "simpleshot":
        cfg.method, cfg.options = "simpleshot", {}
        defaults = fs.methods.get("simpleshot").run_defaults
        cfg.pretrain_epochs = a.simpleshot_epochs
        cfg.train.episodes, cfg.train.lr = defaults["train"]["episodes"], defaults["train"]["lr"]
    return cfg


def train_row(cfg: fs.RunConfig, out: Path, budget_s: float) -> tuple:
    """``(run, pretraining s, meta-training s, meta-training steps)`` of ``cfg`` trained within ``budget_s``
    of training time into a fresh ``out``."""
    if not cfg.pretrain_epochs:
        cfg.train.time_limit_s = budget_s
        run = fs.fit(cfg, out, progress=False, overwrite=True)
        return run, 0.0, run.train_result.train_time_s, run.train_result.steps
    first = copy.deepcopy(cfg)
    first.train.time_limit_s = 1.0
    fs.fit(first, out, progress=False, overwrite=True)
    pre_s = float(checkpoint.load(out / "checkpoints" / "pretrain.pt")["train_time_s"])
    cfg.train.time_limit_s = max(budget_s - pre_s, 1.0)
    run = fs.fit(cfg, out, resume=True, progress=False)
    return run, pre_s, run.train_result.train_time_s, run.train_result.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training-time budget of every row")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "protonet_omniglot_small.yaml"))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_pretrain_omniglot"))
    ap.add_argument("--pretrain-epochs", type=int, default=10, help="protonet-pretrained's pretraining epochs")
    ap.add_argument("--simpleshot-epochs", type=int, default=20, help="simpleshot's pretraining epochs")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--eval-only", action="store_true", help="test the rows already trained in --out")
    ap.add_argument("--features", default=None, help="simpleshot row: score with this feature transform")
    ap.add_argument("--tta", type=int, default=0, help="also score with this many test-time augmentation copies")
    ap.add_argument("--finetune-steps", type=int, default=0, help="also score with test-time fine-tuning")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-episodes", type=int, default=1000, help="episodes per fine-tuned setting")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    recipe = fs.RunConfig.load(a.recipe)
    print(f"machine: {machine()}", flush=True)
    rows, results = [], []
    for key in a.rows.split(","):
        if key not in ROWS:
            raise SystemExit(f"unknown row {key!r}; rows: {', '.join(ROWS)}")
        cfg = row_config(key, recipe, a)
        t0 = time.time()
        if a.eval_only:
            run = fs.load_run(Path(a.out) / key)
            cfg = run.config
            last = checkpoint.load(Path(a.out) / key / "checkpoints" / "last.pt")
            pre = Path(a.out) / key / "checkpoints" / "pretrain.pt"
            pre_s = float(checkpoint.load(pre)["train_time_s"]) if pre.is_file() else 0.0
            meta_s, steps = float(last["train_time_s"]), int(last["step"])
        else:
            run, pre_s, meta_s, steps = train_row(cfg, Path(a.out) / key, a.minutes * 60)
        if a.features and cfg.method == "simpleshot":
            run.method.config.features = a.features
            key = f"{key} ({a.features})"
        print(f"{key}: pretraining {pre_s:.0f} s ({cfg.pretrain_epochs} epochs), meta-training {meta_s:.0f} s "
              f"({steps} steps), {time.time() - t0:.0f} s wall", flush=True)
        columns = [("plain", evaluate_settings(run, SETTINGS, a.test_episodes, tta=0))]
        if a.tta:
            columns.append((f"tta{a.tta}", evaluate_settings(run, SETTINGS, a.test_episodes, tta=a.tta)))
        if a.finetune_steps:
            columns.append((f"ft{a.finetune_steps}", evaluate_settings(
                run, SETTINGS, a.finetune_episodes, tta=0, finetune_steps=a.finetune_steps,
                finetune_lr=a.finetune_lr)))
        results.append({"row": key, "pretrain_s": pre_s, "pretrain_epochs": cfg.pretrain_epochs,
                         "meta_s": meta_s, "steps": steps,
                         **{f"{w}w{k}s{'' if name == 'plain' else '-' + name}": [r.mean, r.ci95, r.n]
                            for name, scores in columns for w, k, r, _ in scores}})
        print(json.dumps(results[-1]), flush=True)
        training = (f"{cfg.pretrain_epochs} ep / {pre_s / 60:.1f} min" if cfg.pretrain_epochs else "none")
        rows.append([key, training, f"{steps} / {meta_s / 60:.1f} min"]
                    + [f"{r.mean:.2f} ± {r.ci95:.2f}" + ("" if r.n == a.test_episodes else f" ({r.n} ep)")
                       for _, scores in columns for _, _, r, _ in scores])
        headers = [f"{w}-way {k}-shot{'' if name == 'plain' else ', ' + name} (%)" for name, _ in columns
                   for w, k in SETTINGS]
    print()
    print(f"Omniglot small background sets, test Korean + Tagalog (57 classes), {a.test_episodes} episodes per "
          f"setting, 15 queries, budget {a.minutes:g} min of training per row, {a.threads} thread(s)")
    print(f"columns: plain images{f'; {a.tta} test-time augmentation copies (tta{a.tta})' if a.tta else ''}"
          f"{f'; test-time fine-tuning, {a.finetune_steps} steps at lr {a.finetune_lr:g} (ft{a.finetune_steps})' if a.finetune_steps else ''}")
    print(table(rows, ["row", "pretraining (epochs / time)", "meta-training (steps / time)", *headers]))


if __name__ == "__main__":
    main()
