"""DEML (learning to learn in concept space, Zhou, Wu & Li 2018) on the Omniglot minimal background sets: the
same meta-learner with and without the concept discriminator, the same training time per row.

Training: every alphabet of images_background_small1/2 except Korean and Tagalog (rotations as new classes, the
affine jitter of the other Omniglot benchmarks). Test: 1000 fixed-seed episodes (``--episodes``) of the 57
Korean + Tagalog characters, 15 queries per class, 1-shot at 5 and 20 ways. External labelled set of the
concept discriminator: the built-in ``glyphs`` (about 2 970 Unicode characters x 20 renderings, 28x28),
``--concept-batch`` images per step.

Rows (each meta-trained for ``--minutes``; a row with the discriminator spends part of that time on it):

* ``protonet`` / ``protonet-l0.1`` / ``-l0.3`` / ``-l1``: prototypical network (Conv-4, 64 channels) on 20-way
  1-shot 15-query tasks, lambda = 0 (no discriminator: exactly the method alone), 0.1, 0.3, 1; one model tested
  at both settings.
* ``protonet-c200-l1``: lambda = 1 with a seeded random 200 of the glyph classes (``--concept-classes 200``).
* ``maml-5`` / ``maml-5-l1``: MAML (recipes/maml_omniglot_small.yaml's network and steps) on 5-way 1-shot
  15-query tasks, meta-batch 32, tested at 5 ways (10 test steps); ``maml-20`` / ``maml-20-l1``: 20-way 1-shot
  5-query tasks, meta-batch 8, tested at 20 ways; the ``-l1`` rows: lambda = 1, 200 glyph classes.

Published (DEML, 5-way 1-shot): MAML 49.28 -> DEML+MAML 56.65 on CIFAR-100 (external set: ImageNet classes; a
far deeper concept generator than Conv-4); no Omniglot row is published.

CIFAR-100 is not available here. Its stand-in (rows ``mini32-maml`` / ``mini32-maml-l1``, not run by default):
mini-ImageNet (``--mini-data``, 100 classes x 600 images, CIFAR-100's shape) resized to 32x32 RGB, its
published 64/16/20 class split, MAML (Conv-4, 32 channels) 5-way 1-shot 15-query tasks, meta-batch 4, tested
5-way 1-shot; external set ``--mini-concept``: a folder of Tiny-ImageNet-200 classes without the 100
mini-ImageNet ones (175 classes x 550 images here).

usage: python benchmarks/omniglot_deml.py [--minutes 3] [--rows protonet,protonet-l1] [--maml-episodes 300]
       python benchmarks/omniglot_deml.py --rows mini32-maml,mini32-maml-l1 --mini-data DIR --mini-concept DIR
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import OMNIGLOT, TEST_ALPHABETS, add_row_options, drive_rows, evaluate_settings, exit_if_failed, machine, table

SETTINGS = [(5, 1), (20, 1)]
MAML_OPTIONS = {"hidden": 64, "bn": "transductive", "inner_steps": 1, "inner_lr": 0.4, "test_steps": 10}
#: key -> (label, method, lambda (None: no discriminator), (ways, shots, queries, meta-batch), tested settings)
ROWS = {
    "protonet": ("ProtoNets", "protonet", None, (20, 1, 15, 1), SETTINGS),
    "protonet-l0.1": ("DEML + ProtoNets", "protonet", 0.1, (20, 1, 15, 1), SETTINGS),
    "protonet-l0.3": ("DEML + ProtoNets", "protonet", 0.3, (20, 1, 15, 1), SETTINGS),
    "protonet-l1": ("DEML + ProtoNets", "protonet", 1.0, (20, 1, 15, 1), SETTINGS),
    "protonet-c200-l1": ("DEML + ProtoNets", "protonet", 1.0, (20, 1, 15, 1), SETTINGS),
    "maml-5": ("MAML", "maml", None, (5, 1, 15, 32), SETTINGS[:1]),
    "maml-5-l1": ("DEML + MAML", "maml", 1.0, (5, 1, 15, 32), SETTINGS[:1]),
    "maml-20": ("MAML", "maml", None, (20, 1, 5, 8), SETTINGS[1:]),
    "maml-20-l1": ("DEML + MAML", "maml", 1.0, (20, 1, 5, 8), SETTINGS[1:]),
    "mini32-maml": ("MAML (mini-ImageNet 32x32)", "maml", None, (5, 1, 15, 4), SETTINGS[:1]),
    "mini32-maml-l1": ("DEML + MAML (mini-ImageNet 32x32)", "maml", 1.0, (5, 1, 15, 4), SETTINGS[:1]),
}
#: rows whose discriminator learns a seeded random subset of the external classes (--concept-classes)
CLASSES = {"protonet-c200-l1": 200, "maml-5-l1": 200, "maml-20-l1": 200}
#: the rows on the CIFAR-100 stand-in (their data and external set are not Omniglot's)
MINI = ("mini32-maml", "mini32-maml-l1")
MINI_MAML = {"hidden": 32, "bn": "transductive", "inner_steps": 1, "inner_lr": 0.1, "test_steps": 10}


def make_cfg(key: str, a):
    import fewshot as fs
    label, method, weight, (ways, shots, queries, batch), _ = ROWS[key]
    if key in MINI:
        cfg = fs.RunConfig(method=method, data=a.mini_data, size=32, channels=3, split="published", val_fraction=0.0,
                           ways=ways, shots=shots, queries=queries, batch=batch, test_ways=ways, test_shots=shots,
                           test_queries=15)
    else:
        cfg = fs.RunConfig(method=method, data=a.data, size=28, split="group:" + ",".join(TEST_ALPHABETS),
                           val_fraction=0.0, rotations=True, ways=ways, shots=shots, queries=queries, batch=batch,
                           augment={"affine": {"degrees": 10, "scale": [0.9, 1.1], "shear": 5, "translate": 0.1}},
                           test_ways=ways, test_shots=shots, test_queries=15)
    if weight is not None:
        cfg.concept_data = a.mini_concept if key in MINI else a.concept_data
        cfg.concept_weight, cfg.concept_batch = weight, a.concept_batch
        cfg.concept_classes = CLASSES.get(key, 0)
    if method == "maml":
        cfg.options = dict(MINI_MAML if key in MINI else MAML_OPTIONS)
        cfg.train.schedule = "none"
    else:
        cfg.train.schedule, cfg.train.step_size, cfg.train.gamma = "step", 1000, 0.5
    cfg.train.lr, cfg.train.val_every = 1e-3, 0
    cfg.train.episodes, cfg.train.time_limit_s, cfg.train.ckpt_every = 10 ** 7, a.minutes * 60, 10 ** 7
    return cfg


def run_row(key: str, a) -> dict:
    import json

    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    t0 = time.time()
    cfg = make_cfg(key, a)
    row = {"key": key, "label": ROWS[key][0], "weight": ROWS[key][2], "classes": cfg.concept_classes,
           "machine": machine(), "threads": a.threads}
    out = Path(a.out) / key
    run = fs.fit(cfg, out, progress=False, overwrite=True)
    res = run.train_result
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ce = [r["concept_ce"] for r in rows if "concept_ce" in r]
    row.update({"method": cfg.method, "shape": ROWS[key][3], "train_s": res.train_time_s, "steps": res.steps,
                "fit_wall_s": time.time() - t0, "results": {},
                # D's training cross-entropy on the external mini-batches: first and last tenth of the logged steps
                "concept_ce": [sum(ce[:max(1, len(ce) // 10)]) / max(1, len(ce) // 10),
                               sum(ce[-max(1, len(ce) // 10):]) / max(1, len(ce) // 10)] if ce else None})
    episodes = a.maml_episodes if cfg.method == "maml" and a.maml_episodes else a.episodes
    for w, k, r, _ in evaluate_settings(run, ROWS[key][4], episodes):
        row["results"][f"{w}w{k}s"] = {"mean": r.mean, "ci95": r.ci95, "n": r.n, "mode": r.mode}
    row["wall_s"] = time.time() - t0
    return row


def render(rows: list, episodes: int) -> str:
    cols = [f"{w}w{k}s" for w, k in SETTINGS]

    def cell(res: dict, c: str) -> str:
        x = res.get(c)
        if not x:
            return ""
        return f"{x['mean']:.2f} ± {x['ci95']:.2f}" + ("" if x["n"] == episodes else f" ({x['n']} ep)")

    body = []
    for r in rows:
        if r["key"] in MINI and not any(b[0].startswith("MAML 49.28") for b in body):
            body.append(["MAML 49.28 -> DEML + MAML 56.65, published (CIFAR-100, 5-way 1-shot)", "", "", "", "", "",
                         ""])
        lam = "— (no D)" if r["weight"] is None else f"{r['weight']:g}" + (
            f" ({r['classes']} classes)" if r.get("classes") else " (all classes)")
        d = "" if not r.get("concept_ce") else f"{r['concept_ce'][0]:.2f} → {r['concept_ce'][1]:.2f}"
        body.append([r["label"], lam, f"{r['shape'][0]}-way {r['shape'][1]}-shot {r['shape'][2]}q x{r['shape'][3]}",
                     f"{r['train_s'] / 60:.1f} min / {r['steps']}", d, *[cell(r["results"], c) for c in cols]])
    return table(body, ["method", "λ", "training tasks", "meta-training (time / steps)", "D's CE (first → last tenth)",
                        "5-way 1-shot", "20-way 1-shot"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="meta-training budget of every row")
    ap.add_argument("--rows", default=",".join(k for k in ROWS if k not in MINI),
                    help="comma-separated row keys: " + ", ".join(ROWS))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--mini-data", default="mini-imagenet", help="mini-ImageNet (the mini32-* rows)")
    ap.add_argument("--mini-concept", default=None,
                    help="the mini32-* rows' external set: Tiny-ImageNet classes without mini-ImageNet's")
    ap.add_argument("--concept-data", default="glyphs", help="the discriminator's external labelled set")
    ap.add_argument("--concept-batch", type=int, default=64, help="external images per step")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    ap.add_argument("--maml-episodes", type=int, default=None,
                    help="test episodes per setting of the MAML rows (default: --episodes; 10 inner steps per "
                         "episode make them the slowest to test)")
    add_row_options(ap, out="runs/bench_deml", jobs=1, threads=2)
    a = ap.parse_args()
    keys = [k for k in a.rows.split(",") if k]
    bad = [k for k in keys if k not in ROWS]
    if bad:
        sys.exit(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    if any(k in MINI for k in keys) and not a.mini_concept:
        sys.exit("the mini32-* rows need --mini-concept FOLDER")
    forward = ["--minutes", str(a.minutes), "--data", a.data, "--concept-data", a.concept_data, "--concept-batch",
               str(a.concept_batch), "--episodes", str(a.episodes), "--mini-data", a.mini_data]
    if a.mini_concept:
        forward += ["--mini-concept", a.mini_concept]
    if a.maml_episodes:
        forward += ["--maml-episodes", str(a.maml_episodes)]
    driven = drive_rows(__file__, a, keys, run_row, forward)
    if driven is None:                            # a row process: it trained and scored its row
        return
    results, failed = driven
    print()
    print(f"Omniglot small background sets -> Korean + Tagalog (57 classes), {a.episodes} test episodes per "
          f"setting, 15 queries; every row meta-trained {a.minutes} min, {a.jobs} row(s) at a time x {a.threads} "
          f"thread(s); concept discriminator on {a.concept_data}, {a.concept_batch} images per step")
    print(render(results.latest(list(ROWS), keys), a.episodes))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
