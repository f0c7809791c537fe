"""Siamese audio recognition on real clips: spoken digits, one-shot on voices never heard.

Data: the Free Spoken Digit Dataset (Jackson et al., CC BY-SA 4.0; 3 000 WAV clips at 8 kHz, the digits
0-9 spoken 50 times each by 6 speakers), extracted outside the repository with
``bash ../shared/data/get_fsdd.sh GIT_DIR /work/data/fsdd`` (see ../shared/data/README.md). Any folder that
holds the clips as ``<digit>_<speaker>_<n>.wav``, flat or in subfolders, will do.

The experiment: every (digit, speaker) pair is a class, 60 classes of 50 clips. They are laid out as a
folder of class folders ``<digit>_<speaker>/`` (symbolic links to the clips, under --out), read by
fewshot's audio loader (``fewshot.data.audio``: resampled to 16 kHz, cut or padded to 1 s, 40 MFCCs every
10 ms, a ``[1, 40, 101]`` map per clip). The Siamese network trains on the 40 classes of the first four
speakers (sorted by name; --test-speakers picks the held-out ones) and is tested on the 20 classes of the
other two, voices it never heard, through a ``files:`` class split (the class lists are written under
--out). It trains for a fixed number of steps (--steps) with the contrastive loss; after training fit
calibrates its same/different threshold on training pairs. Each --backbones entry is one run: ``mlp`` is
the dense encoder 128-128-128 of the book's audio experiment, ``conv1d`` convolves over time with the
coefficients as channels.

Reported on the held-out speakers' classes, beside nearest neighbour on the MFCC maps themselves
(Euclidean distance on the flattened maps):

- N-way 1-shot accuracy (--ways, default 5, 10 and 20; 15 queries, --episodes fixed-seed episodes): the
  network's nearest support clip against the evaluation's own raw-input 1-NN baseline on the very same
  episodes;
- same/different (genuine/impostor) accuracy on --pairs balanced pairs of held-out clips: the network's
  energy at its calibrated threshold against the MFCC distance at a threshold calibrated the same way (the
  accuracy-maximising one on --pairs training pairs), both on the same pairs; the genuine and impostor
  halves separately too;
- triplet accuracy: the share of --pairs held-out triplets with d(a, p) < d(a, n), for both distances.

All with 95% CIs, as a markdown table.

usage: python benchmarks/audio_fsdd.py [--fsdd /work/data/fsdd] [--steps 3000] [--backbones mlp conv1d]
                                       [--test-speakers theo yweweler] [--ways 5 10 20] [--episodes 1000]
                                       [--pairs 2000] [--out /tmp/bench/audio_fsdd]
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import torch

from common import fit_fresh, table

import fewshot as fs
from fewshot import data as fsdata
from fewshot.data.pairs import PairSampler, TripletSampler
from fewshot.methods.siamese import best_threshold, pair_energy
from fewshot.run import test_classes

#: ``<digit>_<speaker>_<take>.wav``, the FSDD's file names
CLIP_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


# ------------------------------------------------------------------------------------------ the 60 classes
def build_classes(fsdd: Path, dest: Path) -> dict:
    """Lay the FSDD clips under ``fsdd`` out as ``dest/<digit>_<speaker>/<clip>.wav`` (symbolic links;
    ``dest`` is rebuilt when the clips differ) and return ``{speaker: [class names]}``, speakers sorted."""
    clips = sorted(p for p in fsdd.rglob("*.wav") if CLIP_NAME.match(p.name))
    if not clips:
        raise SystemExit(f"no FSDD clips (<digit>_<speaker>_<n>.wav) under {fsdd}; extract them with "
                         "../shared/data/get_fsdd.sh")
    speakers: dict = {}
    for p in clips:
        digit, speaker, _ = CLIP_NAME.match(p.name).groups()
        folder = dest / f"{digit}_{speaker}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / p.name
        if link.is_symlink() and os.readlink(link) != str(p.resolve()):
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(p.resolve())
        speakers.setdefault(speaker, set()).add(folder.name)
    return {s: sorted(speakers[s]) for s in sorted(speakers)}


def write_split(speakers: dict, test_speakers: list, out: Path) -> tuple:
    """The class lists of a ``files:`` split: training classes of every speaker but ``test_speakers``,
    test classes of those. Returns (train list path, test list path)."""
    unknown = [s for s in test_speakers if s not in speakers]
    if unknown:
        raise SystemExit(f"--test-speakers: no clips of {', '.join(unknown)} (speakers: {', '.join(speakers)})")
    train = [c for s, cs in speakers.items() if s not in test_speakers for c in cs]
    test = [c for s in test_speakers for c in speakers[s]]
    paths = out / "classes-train.txt", out / "classes-test.txt"
    for path, names in zip(paths, (train, test)):
        path.write_text("\n".join(names) + "\n")
    return paths


# ------------------------------------------------------------------------------------------ verification
def ci95(v: torch.Tensor) -> tuple:
    """Mean of a 0/1 tensor in percent and its 95% normal CI."""
    p = float(v.float().mean())
    return 100 * p, 100 * 1.96 * math.sqrt(p * (1 - p) / v.numel())


def mfcc_distance(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the flattened MFCC maps of aligned clip pairs (the baseline's energy)."""
    return pair_energy(x1.flatten(1), x2.flatten(1))


@torch.no_grad()
def chunked(energy, x1: torch.Tensor, x2: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``energy(x1, x2)`` over aligned pairs, ``chunk`` pairs per call."""
    return torch.cat([energy(x1[i:i + chunk], x2[i:i + chunk]).float() for i in range(0, len(x1), chunk)])


@torch.no_grad()
def verification(energies: dict, thresholds: dict, test_ds, pairs: int, seed: int) -> dict:
    """Same/different and triplet accuracy of each ``energies[name]`` (a function of two clip batches) on
    the same ``pairs`` balanced pairs and ``pairs`` triplets of ``test_ds``; ``thresholds[name]``: the
    energy at or below which a pair is called "same"."""
    p = PairSampler(test_ds, pairs, seed=seed).sample()
    t = TripletSampler(test_ds, pairs, seed=seed + 1).sample()
    out = {}
    for name, energy in energies.items():
        said_same = chunked(energy, p.x1, p.x2) <= thresholds[name]
        correct = said_same.long() == p.same
        won = chunked(energy, t.anchor, t.positive) < chunked(energy, t.anchor, t.negative)
        out[name] = {"binary": ci95(correct), "genuine": ci95(correct[p.same == 1]),
                     "impostor": ci95(correct[p.same == 0]), "triplet": ci95(won),
                     "threshold": float(thresholds[name])}
    return out


@torch.no_grad()
def calibrated_threshold(energy, train_ds, pairs: int, seed: int) -> float:
    """The accuracy-maximising "same iff energy <= t" threshold on ``pairs`` balanced training pairs."""
    p = PairSampler(train_ds, pairs, seed=seed).sample()
    return best_threshold(chunked(energy, p.x1, p.x2), p.same)[0]


# ------------------------------------------------------------------------------------------ one run
def train_one(a, root: Path, lists: tuple, backbone: str):
    cfg = fs.RunConfig(method="siamese", data=str(root), split=f"files:{lists[0]},{lists[1]}", val_fraction=0,
                       ways=a.train_ways, shots=1, queries=a.queries, batch=1, seed=a.seed,
                       options={"backbone": backbone, "loss": a.loss, "calibration_pairs": a.pairs})
    cfg.train.episodes = a.steps
    cfg.train.val_every = 0
    cfg.train.ckpt_every = 10 ** 7
    cfg.train.schedule = "none"
    run, _ = fit_fresh(cfg, Path(a.out) / f"run-{backbone}")
    return run


def fmt(m: float, ci: float) -> str:
    return f"{m:.2f} ± {ci:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsdd", default="/work/data/fsdd", help="the extracted FSDD clips (get_fsdd.sh's OUT)")
    ap.add_argument("--test-speakers", nargs="+", default=None,
                    help="held-out speakers (default: the last two names sorted: theo, yweweler)")
    ap.add_argument("--backbones", nargs="+", default=["mlp", "conv1d"], help="one Siamese run per encoder")
    ap.add_argument("--loss", default="contrastive", choices=["contrastive", "triplet"])
    ap.add_argument("--steps", type=int, default=3000, help="training steps per run")
    ap.add_argument("--train-ways", type=int, default=16, help="classes per training episode")
    ap.add_argument("--queries", type=int, default=3, help="clips per class per episode beyond the first")
    ap.add_argument("--ways", type=int, nargs="+", default=[5, 10, 20], help="N of the N-way 1-shot tests")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per N-way setting")
    ap.add_argument("--pairs", type=int, default=2000, help="pairs (and triplets) for calibration and tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench/audio_fsdd", help="class folders, lists and runs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    speakers = build_classes(Path(a.fsdd), out / "fsdd60")
    test_speakers = a.test_speakers or list(speakers)[-2:]
    lists = write_split(speakers, test_speakers, out)
    train_speakers = [s for s in speakers if s not in test_speakers]
    print(f"{len(speakers)} speakers; training classes: {', '.join(train_speakers)} x 10 digits; "
          f"test classes: {', '.join(test_speakers)} x 10 digits", flush=True)

    columns, shots, pairs, steps = [], {}, {}, {}
    baseline = None
    for backbone in a.backbones:
        run = train_one(a, out / "fsdd60", lists, backbone)
        name = f"Siamese {backbone}"
        columns.append(name)
        steps[name] = (run.train_result.steps, run.train_result.train_time_s)
        test_ds = test_classes(run)
        train_ds = fsdata.load_like(str(out / "fsdd60"), run.preprocess).split_by_names(
            lists[0].read_text().split())[0]
        for w in a.ways:
            r = fs.evaluate_run(run, ways=w, shots=1, queries=15, episodes=a.episodes, progress=False)
            print(f"{name} {w}-way 1-shot: {r}; {r.baseline_line()}", flush=True)
            shots[name, w] = fmt(r.mean, r.ci95)
            shots["MFCC 1-NN", w] = fmt(r.baseline, r.baseline_ci95)   # the same episodes for every run
        method = run.method.eval()          # batch norm on running statistics, as its calibration was
        energies = {name: method.energy}
        thresholds = {name: float(method.threshold)}
        if baseline is None:
            energies["MFCC 1-NN"] = mfcc_distance
            thresholds["MFCC 1-NN"] = calibrated_threshold(mfcc_distance, train_ds, a.pairs, a.seed)
        res = verification(energies, thresholds, test_ds, a.pairs, seed=a.seed + 100)
        baseline = res.get("MFCC 1-NN", baseline)
        pairs[name] = res[name]
        for n, v in res.items():
            print(f"{n}: " + ", ".join(f"{k} {fmt(*v[k])} %" for k in ("binary", "genuine", "impostor", "triplet"))
                  + f", threshold {v['threshold']:.3f}", flush=True)
    pairs["MFCC 1-NN"] = baseline
    columns.append("MFCC 1-NN")

    rows = [[f"{w}-way 1-shot (%)", *(shots[c, w] for c in columns)] for w in a.ways]
    for key, label in (("binary", "same/different, balanced (%)"), ("genuine", "  genuine pairs called same (%)"),
                       ("impostor", "  impostor pairs called different (%)"), ("triplet", "triplet acc (%)")):
        rows.append([label, *(fmt(*pairs[c][key]) for c in columns)])
    rows.append(["threshold", *(f"{pairs[c]['threshold']:.3f}" for c in columns)])
    rows.append(["training steps (min)", *(f"{steps[c][0]} ({steps[c][1] / 60:.1f})" if c in steps else "-"
                                           for c in columns)])
    print()
    print(f"FSDD as 60 digit x speaker classes; trained on {', '.join(train_speakers)} (40 classes), tested on "
          f"{', '.join(test_speakers)} (20 classes, voices never heard); {a.loss} loss, {a.train_ways}-way "
          f"{1 + a.queries}-clip training episodes, {a.steps} steps; one-shot on {a.episodes} episodes "
          f"(15 queries), pairs/triplets: {a.pairs} held-out (thresholds from {a.pairs} training pairs); 95% CIs")
    print(table(rows, ["held-out speakers", *columns]))


if __name__ == "__main__":
    main()
