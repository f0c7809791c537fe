"""Meta-learning without labels on the Omniglot minimal background sets: CACTUs-ProtoNets, CACTUs-MAML and
UMTRA beside the supervised run of the same method and the embedding's own nearest-neighbour accuracy.

Training images: every alphabet of images_background_small1/2 except Korean and Tagalog (185 characters x 20
drawings = 3 700 images), **labels removed** for the label-free rows (``--tasks cactus|umtra``: the sampler
sees only the images, in a canonical order). Test: 1000 fixed-seed episodes of the 57 Korean + Tagalog
characters with their real labels, 15 queries per class, at 5-way 1/5-shot and 20-way 1/5-shot.

Rows (each trained for ``--minutes`` of meta-training, or exactly ``--steps`` meta-steps; the embedding and
the clustering come before that and are cached, so the label-free rows share one learned embedding):

* ``embedding``: the contrastive Conv-4 embedding learned without labels (``--embed-steps`` steps), and the
  PCA-64 floor: nearest support mean in the embedding, no meta-training (fewshot.unsupervised.embedding_accuracy).
* ``cactus-protonet`` / ``protonet``: prototypical network on 20-way 5-shot 5-query tasks of clusters /
  of real classes, one model tested at all four settings.
* ``cactus-maml-5`` / ``umtra-maml-5`` / ``maml-5``: MAML (recipes/maml_omniglot_small.yaml's network and
  steps) on 5-way 1-shot 15-query tasks, meta-batch 32, tested at 5 ways (10 test steps);
  ``...-20``: the same at 20 ways, 5 queries, meta-batch 8, tested at 20 ways.

Published on *full* Omniglot (1 100 training characters; here 185): CACTUs-MAML 68.84 / 87.78 / 48.09 /
73.36, CACTUs-ProtoNets 68.12 / 83.58 / 47.75 / 66.27, UMTRA 83.80 / 95.43 / 74.25 / 92.12 (5w1s / 5w5s /
20w1s / 20w5s).

usage: nice -n 10 python benchmarks/omniglot_unsupervised.py [--minutes 3] [--rows embedding,cactus-protonet]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import (OMNIGLOT, TEST_ALPHABETS, RowResults, add_budget_options, add_row_options, budget_args,
                    drive_rows, evaluate_settings, exit_if_failed, machine, set_budget, table)

SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]
PUBLISHED = {"CACTUs-MAML": (68.84, 87.78, 48.09, 73.36), "CACTUs-ProtoNets": (68.12, 83.58, 47.75, 66.27),
             "UMTRA (MAML)": (83.80, 95.43, 74.25, 92.12)}
MAML_OPTIONS = {"hidden": 64, "bn": "transductive", "inner_steps": 1, "inner_lr": 0.4, "test_steps": 10}
#: key -> (label, method, tasks kind, episode shape, tested settings)
ROWS = {
    "embedding": ("embedding alone (nearest support mean)", None, "cactus", None, SETTINGS),
    "cactus-protonet": ("CACTUs-ProtoNets", "protonet", "cactus", (20, 5, 5, 1), SETTINGS),
    "protonet": ("ProtoNets, supervised (real labels)", "protonet", "labels", (20, 5, 5, 1), SETTINGS),
    "cactus-maml-5": ("CACTUs-MAML", "maml", "cactus", (5, 1, 15, 32), SETTINGS[:2]),
    "umtra-maml-5": ("UMTRA (MAML)", "maml", "umtra", (5, 1, 15, 32), SETTINGS[:2]),
    "maml-5": ("MAML, supervised (real labels)", "maml", "labels", (5, 1, 15, 32), SETTINGS[:2]),
    "cactus-maml-20": ("CACTUs-MAML", "maml", "cactus", (20, 1, 5, 8), SETTINGS[2:]),
    "umtra-maml-20": ("UMTRA (MAML)", "maml", "umtra", (20, 1, 5, 8), SETTINGS[2:]),
    "maml-20": ("MAML, supervised (real labels)", "maml", "labels", (20, 1, 5, 8), SETTINGS[2:]),
}


def cactus_spec(a) -> str:
    return f"cactus:steps={a.embed_steps},partitions={a.partitions}"


def make_cfg(key: str, a):
    import fewshot as fs
    label, method, kind, (ways, shots, queries, batch), _ = ROWS[key]
    cfg = fs.RunConfig(method=method, data=a.data, size=28, split="group:" + ",".join(TEST_ALPHABETS),
                       val_fraction=0.0, ways=ways, shots=shots, queries=queries, batch=batch,
                       augment={"affine": {"degrees": 10, "scale": [0.9, 1.1], "shear": 5, "translate": 0.1}},
                       tasks=cactus_spec(a) if kind == "cactus" else kind, test_ways=ways, test_shots=shots,
                       test_queries=15)
    if method == "maml":
        cfg.options = dict(MAML_OPTIONS)
        cfg.train.schedule = "none"
    else:
        cfg.train.schedule, cfg.train.step_size, cfg.train.gamma = "step", 1000, 0.5
    cfg.train.lr, cfg.train.val_every = 1e-3, 0
    cfg.train.ckpt_every = 10 ** 7
    set_budget(cfg.train, a, 10 ** 7)
    return cfg


def embedding_row(a) -> dict:
    import fewshot as fs
    from fewshot import unsupervised as U
    from fewshot.precision import resolve_device, resolve_precision
    ds = fs.data.load(a.data, size=28)
    train, test = ds.split_by_group(TEST_ALPHABETS)
    pool = U.image_pool(train)
    precision = resolve_precision("auto", resolve_device("cpu"))
    row = {"results": {}, "embeddings": {}}
    for name, spec in (("contrastive", U.parse_tasks(cactus_spec(a))),
                       ("pca", U.parse_tasks("cactus:embedding=pca,dim=64"))):
        t = time.time()
        emb = U.cached_embedding(pool, spec, seed=0, precision=precision if name == "contrastive" else "fp32",
                                 log=lambda s: print(s, flush=True))
        row["embeddings"][name] = {"seconds": time.time() - t, "spec": str(spec)}
        for w, k in SETTINGS:
            m, ci, n = U.embedding_accuracy(emb, test, w, k, 15, a.episodes)
            row["results"].setdefault(name, {})[f"{w}w{k}s"] = {"mean": m, "ci95": ci, "n": n}
            print(f"{name} {w}w{k}s: {m:.2f} ± {ci:.2f}", flush=True)
    return row


def run_row(key: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import fewshot as fs
    t0 = time.time()
    row = {"key": key, "label": ROWS[key][0], "machine": machine(), "threads": a.threads}
    if key == "embedding":
        row.update(embedding_row(a))
        row["wall_s"] = time.time() - t0
        return row
    cfg = make_cfg(key, a)
    run = fs.fit(cfg, Path(a.out) / key, progress=False, overwrite=True)
    res = run.train_result
    row.update({"tasks": cfg.tasks, "method": cfg.method, "shape": ROWS[key][3], "train_s": res.train_time_s,
                "steps": res.steps, "fit_wall_s": time.time() - t0, "results": {}})
    episodes = a.maml_episodes if cfg.method == "maml" and a.maml_episodes else a.episodes
    for w, k, r, _ in evaluate_settings(run, ROWS[key][4], episodes):
        row["results"][f"{w}w{k}s"] = {"mean": r.mean, "ci95": r.ci95, "n": r.n, "mode": r.mode}
    row["wall_s"] = time.time() - t0
    return row


def render(rows: list, episodes: int) -> str:
    body = []
    cols = [f"{w}w{k}s" for w, k in SETTINGS]

    def cell(res: dict, c: str) -> str:
        x = res.get(c)
        if not x:
            return ""
        return f"{x['mean']:.2f} ± {x['ci95']:.2f}" + ("" if x["n"] == episodes else f" ({x['n']} ep)")

    merged: dict = {}          # the 5-way and 20-way MAML models of one kind share a line
    for r in rows:
        if r["key"] == "embedding":
            for name, res in r["results"].items():
                s = r["embeddings"][name]["seconds"]
                body.append([f"{name} embedding, nearest support mean", f"learned in {s / 60:.1f} min (0 if cached)",
                             *[cell(res, c) for c in cols]])
            continue
        base = r["key"].rsplit("-", 1)[0] if r["key"][-2:] in ("-5", "20") else r["key"]
        m = merged.setdefault(base, {"label": r["label"], "train": [], "results": {}})
        m["train"].append(f"{r['train_s'] / 60:.1f} min / {r['steps']}")
        m["results"].update(r["results"])
    for base, m in merged.items():
        body.append([m["label"], " + ".join(m["train"]), *[cell(m["results"], c) for c in cols]])
    for name, vals in PUBLISHED.items():
        body.append([f"{name}, published (full Omniglot)", "", *[f"{v:.2f}" for v in vals]])
    return table(body, ["tasks / method", "meta-training (time / steps)", "5-way 1-shot", "5-way 5-shot",
                        "20-way 1-shot", "20-way 5-shot"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_budget_options(ap, minutes=3.0, unit="meta-steps")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys: " + ", ".join(ROWS))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    ap.add_argument("--maml-episodes", type=int, default=None,
                    help="test episodes per setting of the MAML rows (default: --episodes; 10 inner steps per "
                         "episode make them the slowest to test)")
    ap.add_argument("--embed-steps", type=int, default=300, help="contrastive encoder training steps")
    ap.add_argument("--partitions", type=int, default=100, help="CACTUs partitions")
    add_row_options(ap, out="runs/bench_unsupervised")
    a = ap.parse_args()
    keys = [k for k in a.rows.split(",") if k]
    bad = [k for k in keys if k not in ROWS]
    if bad:
        sys.exit(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    forward = [*budget_args(a), "--data", a.data, "--episodes", str(a.episodes), "--embed-steps",
               str(a.embed_steps), "--partitions", str(a.partitions)]
    if a.maml_episodes:
        forward += ["--maml-episodes", str(a.maml_episodes)]
    if a.row:                                      # a row process: train and score that row
        drive_rows(__file__, a, keys, run_row, forward)
        return
    # the embedding row first and alone: it learns (and caches) the embedding every CACTUs row uses
    failed = []
    for group in ([k for k in keys if k == "embedding"], [k for k in keys if k != "embedding"]):
        if group:
            failed += drive_rows(__file__, a, group, run_row, forward)[1]
    results = RowResults(Path(a.results) if a.results else Path(a.out) / "rows.jsonl")
    rows = results.latest(list(ROWS), keys)
    print()
    print(f"Omniglot small background sets without labels -> Korean + Tagalog (57 classes), {a.episodes} test "
          f"episodes per setting, 15 queries; every row meta-trained "
          f"{f'{a.steps} steps' if a.steps else f'{a.minutes} min'}, {a.jobs} row(s) at a time x "
          f"{a.threads} thread(s); CACTUs: {cactus_spec(a)}")
    print(render(rows, a.episodes))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
