"""Small real data sets: does every metric method's *default* recipe beat raw-pixel nearest neighbour?

Builds two small image folders of the kind users bring (tens of classes x 10 images):

- ``mini``: --classes mini-ImageNet classes (drawn, seeded, from all 100 classes of the Ravi split in
  --mini, default /work/data/mini-imagenet; 84x84 RGB JPEGs) x --per-class images,
- ``omniglot``: --classes Omniglot characters (drawn, seeded, from the 8 alphabets of the two minimal
  background sets in --omniglot) x --per-class drawers, 105x105 black-on-white PNGs,

written as ``<out>/data/<set>/<class>/<image>`` (one folder per class). Then for every metric method it
trains ``fewshot.fit(RunConfig(method=M, data=FOLDER))`` with the defaults (the method's own settings and
the library's; only the training budget is set: --minutes of training time, or with --minutes 0 nothing at
all, the defaults' own number of episodes), one method at a time, and
evaluates --ways-way 1-shot on the held-out classes of the default split (a seeded 80-20 class split:
unseen classes), --episodes episodes with every query the classes have left, beside the raw-pixel 1-NN
baseline that every evaluation scores on the same episodes. A method "beats" the baseline when the two
95% confidence intervals do not overlap.

Rows are appended to ``<out>/rows.jsonl`` as they finish (a rerun skips finished rows; --fresh redoes them)
and the table is printed at the end.

usage: python benchmarks/small_data.py [--sets mini omniglot] [--methods protonet ...] [--minutes 2]
                                       [--episodes 600] [--ways 8] [--out /tmp/bench/small_data]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch

from common import machine, table

import fewshot as fs
from fewshot.methods import available, get

#: the metric (non-gradient-based) methods for image classes; others join if registered
METRIC = ("protonet", "matching", "relation", "siamese", "gaussian", "hallucinate", "taskcond", "semisup",
          "simpleshot")


def build_mini(src: Path, dest: Path, classes: int, per_class: int, seed: int) -> Path:
    """``dest/<wnid>/<file>.jpg``: ``classes`` mini-ImageNet classes x ``per_class`` images, drawn seeded."""
    by_class: dict = {}
    for split in ("train", "val", "test"):
        with open(src / f"{split}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                by_class.setdefault(row["label"], []).append(row["filename"])
    rng = random.Random(seed)
    for wnid in rng.sample(sorted(by_class), classes):
        (dest / wnid).mkdir(parents=True)
        for f in rng.sample(sorted(by_class[wnid]), per_class):
            shutil.copyfile(src / "images" / f, dest / wnid / f)
    return dest


def build_omniglot(src: Path, dest: Path, classes: int, per_class: int, seed: int) -> Path:
    """``dest/<Alphabet>_<character>/<id>_<drawer>.png``: ``classes`` Omniglot characters of the minimal
    background sets x ``per_class`` drawers, drawn seeded (Greek and Latin, in both sets, counted once)."""
    members: dict = {}
    zips = [zipfile.ZipFile(src / f"images_background_small{i}.zip") for i in (1, 2)]
    for zf in zips:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".png") and "__MACOSX" not in name:
                members.setdefault(f"{parts[1]}_{parts[2]}", {})[parts[3]] = (zf, name)
    rng = random.Random(seed)
    for cls in rng.sample(sorted(members), classes):
        (dest / cls).mkdir(parents=True)
        for png in rng.sample(sorted(members[cls]), per_class):
            zf, name = members[cls][png]
            (dest / cls / png).write_bytes(zf.read(name))
    return dest


def build(a, name: str) -> Path:
    dest = Path(a.out) / "data" / name
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    if name == "mini":
        return build_mini(Path(a.mini), dest, a.classes, a.per_class, a.seed)
    return build_omniglot(Path(a.omniglot), dest, a.classes, a.per_class, a.seed)


def run_row(a, set_name: str, folder: Path, method: str) -> dict:
    cfg = fs.RunConfig(method=method, data=str(folder))      # the defaults: nothing else is set but --set
    for key, value in a.set.items():
        setattr(cfg, key, value)
    if a.minutes:                                            # a training-time budget ends the run
        cfg.train.episodes = 10 ** 7
        cfg.train.time_limit_s = a.minutes * 60
    out = Path(a.out) / "runs" / f"{set_name}-{method}{a.label}"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        run = fs.fit(cfg, out, progress=False)
    except fs.FewshotError as e:
        sys.stderr = stderr
        return {"set": set_name, "method": method, "error": str(e)}
    finally:
        sys.stderr = stderr
    tr = run.train_result
    ft = {"finetune_steps": a.finetune_steps, "finetune_lr": a.finetune_lr} if a.finetune_steps else {}
    res = fs.evaluate_run(run, ways=a.ways, shots=1, episodes=a.episodes, progress=False)
    row = {"set": set_name, "method": method, "settings": a.label.lstrip("-") or "defaults", "size": list(run.preprocess.size),
           "channels": run.preprocess.channels, "train_ways": run.config.ways, "train_shots": run.config.shots,
           "steps": tr.steps, "train_s": round(tr.train_time_s, 1), "wall_s": round(time.time() - t0, 1),
           "ways": res.ways, "queries": res.queries, "episodes": res.n, "acc": res.mean, "ci95": res.ci95,
           "baseline": res.baseline, "baseline_ci95": res.baseline_ci95,
           "chose": err.getvalue().strip().replace("\n", " ")}
    if a.finetune_steps:
        r2 = fs.evaluate_run(run, ways=a.ways, shots=1, episodes=a.episodes, progress=False, **ft)
        row.update(ft_acc=r2.mean, ft_ci95=r2.ci95, **ft)
    return row


def verdict(r: dict, acc: str = "acc", ci: str = "ci95") -> str:
    lo, hi = r[acc] - r[ci], r["baseline"] + r["baseline_ci95"]
    return "yes" if lo > hi else "no"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["mini", "omniglot"], choices=["mini", "omniglot"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered metric method")
    ap.add_argument("--mini", default="/work/data/mini-imagenet", help="mini-ImageNet (images/ + the CSVs)")
    ap.add_argument("--omniglot", default="/work/shared/data/omniglot",
                    help="folder with images_background_small1.zip and images_background_small2.zip")
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="which classes and images make the small sets")
    ap.add_argument("--minutes", type=float, default=2.0,
                    help="training time per method; 0: the defaults' own length (their episodes, no time limit)")
    ap.add_argument("--ways", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=0, help="also evaluate with test-time fine-tuning")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="RunConfig fields to set instead of the defaults (YAML values), to measure a change")
    ap.add_argument("--fresh", action="store_true", help="redo rows already in rows.jsonl")
    ap.add_argument("--out", default="/tmp/bench/small_data")
    a = ap.parse_args()
    import yaml
    a.set = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in a.set)}
    a.label = "".join(f"-{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(a.set.items()))
    torch.set_num_threads(a.threads)
    names = a.methods or [m for m in METRIC if m in available()]
    for m in names:
        get(m)
    rows_path = Path(a.out) / "rows.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if rows_path.is_file() and not a.fresh:
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["set"], r["method"], r.get("settings", "defaults"))] = r
    print(f"machine: {machine()}", flush=True)
    for s in a.sets:
        folder = build(a, s)
        for m in names:
            key = (s, m, a.label.lstrip("-") or "defaults")
            if key in done:
                continue
            r = run_row(a, s, folder, m)
            done[key] = r
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    rows = []
    for s in a.sets:
        for m in names:
            r = done[(s, m, a.label.lstrip("-") or "defaults")]
            if "error" in r:
                rows.append([s, m, "-", "-", "-", "-", "-", "-", f"error: {r['error']}", "-"])
                continue
            cells = [s, m, "x".join(map(str, r["size"])), f"{r['train_ways']}w{r['train_shots']}s", r["steps"],
                     f"{r['train_s'] / 60:.1f}", f"{r['acc']:.2f} ± {r['ci95']:.2f}",
                     f"{r['baseline']:.2f} ± {r['baseline_ci95']:.2f}", verdict(r)]
            cells.append(f"{r['ft_acc']:.2f} ± {r['ft_ci95']:.2f} ({verdict(r, 'ft_acc', 'ft_ci95')})"
                         if "ft_acc" in r else "-")
            rows.append(cells)
    budget = f"{a.minutes:g} min of training each" if a.minutes else "the defaults' own training length"
    print(f"\n{a.ways}-way 1-shot on unseen classes, {a.episodes} episodes, {budget} "
          f"({a.classes} classes x {a.per_class} images per set, seed {a.seed})")
    print(table(rows, ["set", "method", "size", "train episodes", "steps", "train min", "accuracy %",
                       "pixel 1-NN %", "beats 1-NN", "fine-tuned %"]))


if __name__ == "__main__":
    main()
