"""mini-ImageNet (Ravi & Larochelle split), 5-way 1/5/10-shot: the source's prototypical-network distances and
hallucination rows, and the best pipeline, each with a fixed training length (steps, epochs) so the rows do not depend on the machine's load; the
training time (wall clock and the process's CPU time) is reported beside.

Data: the usual release layout (``images/`` + ``train.csv``/``val.csv``/``test.csv``, 84x84 RGB JPEGs) in
``--mini`` (default /work/data/mini-imagenet; ``../shared/data/README.md`` says how to build it), read with
``RunConfig(data=PATH)`` and its published split: 64 training, 16 validation and 20 test classes x 600
images. Every row trains a Conv-4 (64 channels, 1 600 features at 84x84) in bf16 autocast with channels-last
memory (this CPU has AMX: 2.7x faster than fp32 here), no augmentation, Adam 1e-3, one torch thread
(validation every 200 steps on 100 validation episodes picks the checkpoint; its time is not training
time). Test: 1000 fixed-seed episodes of the 20 test classes per setting, 15 queries per class, plain
images (no test-time augmentation), one trained model per row scored at 5-way 1, 5 and 10 shots.

Rows:

* ``protonet-sqeuclidean`` / ``-cosine`` / ``-dot``: the prototypical network with the source's three
  distances, trained on 10-way 5-shot 5-query tasks for ``--steps`` steps.
* ``hallucinate-m10`` / ``-m50`` / ``-m100``: the prototypical network with M hallucinated features per class
  (Wang et al. 2018; generator 2D -> 2400 -> 2400 -> D), trained on 10-way 1-shot 10-query tasks
  for ``--steps`` steps.
* ``simpleshot``: the best pipeline found: supervised pretraining of the Conv-4 with a linear classifier over
  the 64 training classes (``--best-epochs`` epochs, batches of 128, Adam 2e-3 cosine-annealed), then
  simpleshot's short episodic stage (100 steps at lr 1e-4, its defaults), CL2N nearest centroid. With
  ``--finetune-steps`` it is also scored with test-time fine-tuning (on ``--finetune-episodes`` episodes:
  fine-tuning a copy of the network per episode costs far more than the plain test).

Reference (the source write-up, mini-ImageNet 5-way): prototypical network 1/5/10-shot 43.65 ± 2.10,
45.55 ± 0.82, 44.01 ± 0.92; hallucination M = 10/50/100: 44.1, 44.26, 47.59; ProtoNet paper (Conv-4, far
longer training): 49.42 / 68.20 at 1/5 shots.

Rows run as separate processes one after another (``--jobs 1``) and are appended to ``OUT/rows.jsonl``; a
rerun skips finished rows (``--fresh`` redoes them). ``--no-eval`` trains only; ``--eval-only`` then scores
the trained rows (e.g. after a change to evaluation), replacing their rows.

usage: python benchmarks/mini_imagenet.py [--rows KEY,...] [--steps 500] [--best-epochs 5]
       python benchmarks/mini_imagenet.py --eval-only [--finetune-steps 10]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RowResults, add_row_options, drive_rows, evaluate_settings, exit_if_failed, machine, table

SETTINGS = [(5, 1), (5, 5), (5, 10)]
ROWS = {   # key: (label, method, options, (train ways, shots, queries))
    "protonet-sqeuclidean": ("protonet, squared Euclidean", "protonet", {"distance": "sqeuclidean"}, (10, 5, 5)),
    "protonet-cosine": ("protonet, cosine", "protonet", {"distance": "cosine"}, (10, 5, 5)),
    "protonet-dot": ("protonet, dot product", "protonet", {"distance": "dot"}, (10, 5, 5)),
    "hallucinate-m10": ("hallucination, M = 10", "hallucinate", {"m": 10}, (10, 1, 10)),
    "hallucinate-m50": ("hallucination, M = 50", "hallucinate", {"m": 50}, (10, 1, 10)),
    "hallucinate-m100": ("hallucination, M = 100", "hallucinate", {"m": 100}, (10, 1, 10)),
    "simpleshot": ("pretrained Conv-4 -> simpleshot (CL2N)", "simpleshot", {}, None),
}
REFERENCE = {
    "protonet-sqeuclidean": "43.65 ± 2.10 / 45.55 ± 0.82 / 44.01 ± 0.92 (source); 49.42 / 68.20 / — (Snell et al.)",
    "hallucinate-m10": "44.1 (source)", "hallucinate-m50": "44.26 (source)", "hallucinate-m100": "47.59 (source)",
}


def make_cfg(key: str, a):
    import fewshot as fs
    _, method, options, shape = ROWS[key]
    cfg = fs.RunConfig(method=method, options=dict(options), data=a.mini, size=84, channels=3, split="published",
                       tta=0, seed=a.seed)
    cfg.train.precision, cfg.train.channels_last = "bf16", True
    cfg.train.val_every, cfg.train.val_episodes, cfg.train.lr = 200, 100, 1e-3
    if shape is not None:
        cfg.ways, cfg.shots, cfg.queries = shape
        cfg.train.episodes = a.steps
    else:                                              # simpleshot: pretraining, then its own episodic stage
        defaults = fs.methods.get("simpleshot").run_defaults
        cfg.pretrain_epochs, cfg.pretrain_batch, cfg.pretrain_lr = a.best_epochs, 128, 2e-3
        cfg.train.episodes, cfg.train.lr = defaults["train"]["episodes"], defaults["train"]["lr"]
        cfg.ways, cfg.shots, cfg.queries = 5, 5, 15
    return cfg


def cpu_s() -> float:
    """CPU time used by this process so far (user + system), in seconds."""
    import resource
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def train(cfg, out: Path) -> tuple:
    """Train ``cfg`` into ``out``: ``(run, pretraining s, meta-training s, steps)`` (training seconds as the
    trainer and the pretraining stage measure them: wall clock, validation and data loading not counted)."""
    import fewshot as fs
    from fewshot import checkpoint
    run = fs.fit(cfg, out, progress=False, overwrite=True)
    pre = out / "checkpoints" / "pretrain.pt"
    pre_s = float(checkpoint.load(pre)["train_time_s"]) if pre.is_file() else 0.0
    return run, pre_s, run.train_result.train_time_s, run.train_result.steps


def score(key: str, run, a) -> dict:
    """The test results of one trained row (and its fine-tuned results when asked)."""
    t0 = time.time()
    res = {}
    for w, k, r, _ in evaluate_settings(run, SETTINGS, a.episodes, tta=0):
        res[f"{w}w{k}s"] = {"mean": r.mean, "ci95": r.ci95, "n": r.n, "baseline": r.baseline,
                            "baseline_ci95": r.baseline_ci95}
    out = {"results": res, "eval_s": time.time() - t0}
    if a.finetune_steps and ROWS[key][1] == "simpleshot":
        ft = {f"{w}w{k}s": {"mean": r.mean, "ci95": r.ci95, "n": r.n}
              for w, k, r, _ in evaluate_settings(run, SETTINGS[:2], a.finetune_episodes, tta=0,
                                                  finetune_steps=a.finetune_steps, finetune_lr=a.finetune_lr)}
        out.update(finetuned=ft, finetune_steps=a.finetune_steps, finetune_lr=a.finetune_lr)
    return out


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    cfg = make_cfg(key, a)
    out = Path(a.out) / "runs" / key
    t0, c0 = time.time(), cpu_s()
    run, pre_s, meta_s, steps = train(cfg, out)
    print(f"{key}: pretraining {pre_s:.0f} s, meta-training {meta_s:.0f} s ({steps} steps)", flush=True)
    row = {"key": key, "machine": machine(), "threads": a.threads, "pretrain_s": pre_s,
           "pretrain_epochs": cfg.pretrain_epochs, "meta_s": meta_s, "steps": steps,
           "train_shape": [cfg.ways, cfg.shots, cfg.queries], "fit_wall_s": time.time() - t0,
           "fit_cpu_s": cpu_s() - c0, "load": open("/proc/loadavg").read().split()[:3]}
    if not a.no_eval:
        row.update(score(key, run, a))
    return row


def eval_only(a, keys: list, results: RowResults) -> None:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    print(f"# {machine()}", flush=True)
    done = {r["key"]: r for r in results.latest(list(ROWS), keys)}
    for key in keys:
        if key not in done:
            print(f"{key}: not trained yet, skipped", flush=True)
            continue
        run = fs.load_run(Path(a.out) / "runs" / key)
        row = {k: v for k, v in done[key].items() if k not in ("results", "finetuned", "eval_s")}
        row.update(score(key, run, a))
        row["eval_machine"] = machine()
        results.append(row)


def cell(r: dict | None) -> str:
    if not r:
        return "—"
    return f"{r['mean']:.2f} ± {r['ci95']:.2f}" + ("" if r.get("n", 1000) == 1000 else f" ({r['n']} ep)")


def render(rows: list) -> str:
    body = []
    for r in rows:
        label, method, _, shape = ROWS[r["key"]]
        tasks = f"{shape[0]}-way {shape[1]}-shot {shape[2]}q" if shape else "5-way 5-shot 15q"
        pre = f"{r['pretrain_epochs']} ep / {r['pretrain_s'] / 60:.1f} min + " if r.get("pretrain_epochs") else ""
        res = r.get("results", {})
        body.append([label, tasks, f"{pre}{r['steps']} steps / {r['meta_s'] / 60:.1f} min "
                     f"({r['fit_cpu_s'] / 60:.0f} CPU min)",
                     *[cell(res.get(f"{w}w{k}s")) for w, k in SETTINGS],
                     cell(res.get("5w1s") and {"mean": res["5w1s"]["baseline"], "ci95": res["5w1s"]["baseline_ci95"]}),
                     REFERENCE.get(r["key"], "")])
        if r.get("finetuned"):
            ft = r["finetuned"]
            body.append([f"{label} + fine-tuning ({r['finetune_steps']} steps, lr {r['finetune_lr']:g})", "", "",
                         cell(ft.get("5w1s")), cell(ft.get("5w5s")), "—", "", ""])
    return table(body, ["row", "training tasks", "training (time / steps)", "5-way 1-shot", "5-way 5-shot",
                        "5-way 10-shot", "pixel 1-NN (1-shot)", "reference"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys")
    ap.add_argument("--mini", default="/work/data/mini-imagenet", help="mini-ImageNet: images/ and the three CSVs")
    ap.add_argument("--steps", type=int, default=500, help="training steps of the distance/hallucination rows")
    ap.add_argument("--best-epochs", type=int, default=5, help="pretraining epochs of the best pipeline")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    ap.add_argument("--finetune-steps", type=int, default=0, help="best row: also score with test-time fine-tuning")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eval", action="store_true", help="train the rows only")
    ap.add_argument("--eval-only", action="store_true", help="score the rows already trained in --out")
    add_row_options(ap, "/tmp/bench/mini_imagenet", jobs=1, threads=1)
    a = ap.parse_args()
    keys = a.rows.split(",")
    for k in keys:
        if k not in ROWS:
            raise SystemExit(f"unknown row {k!r}; rows: {', '.join(ROWS)}")
    if a.eval_only:
        out = Path(a.out)
        results = RowResults(Path(a.results) if a.results else out / "rows.jsonl")
        eval_only(a, keys, results)
        failed = []
    else:
        forward = ["--mini", a.mini, "--steps", str(a.steps), "--best-epochs", str(a.best_epochs), "--episodes", str(a.episodes), "--seed", str(a.seed),
                   "--finetune-steps", str(a.finetune_steps), "--finetune-lr", str(a.finetune_lr),
                   "--finetune-episodes", str(a.finetune_episodes), *(["--no-eval"] if a.no_eval else [])]
        driven = drive_rows(__file__, a, keys, run_row, forward)
        if driven is None:
            return
        results, failed = driven
    print(f"\nmini-ImageNet (Ravi split), 20 test classes, {a.episodes} episodes per setting, 15 queries, "
          f"Conv-4, bf16 + channels-last, {a.threads} thread(s)")
    print(render(results.latest(list(ROWS), keys)))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
