"""fewshot's protonet against easyfsl's ProtoNet trained the same way, on the same test episodes.

Training (issue 14's "same recipe"): the Omniglot minimal background sets without Korean and Tagalog (185
characters; 90/180/270-degree rotations as new classes), 60-way 5-shot 5-query episodes, Adam 1e-3, Conv-4,
fp32, ``--episodes`` steps, seed ``--seed``. Rows, each trained in its own process, one at a time:

- ``fewshot``: ``fewshot train protonet`` with only those settings (``--split group:Korean,Tagalog
  --rotations true --precision fp32``): everything else is fewshot's default;
- ``fewshot-sqeuclidean``, ``fewshot-euclidean``, ``fewshot-noval``, ``fewshot-euclidean-noval``,
  ``fewshot-sqeuclidean-noval``: the same with the distance set (``euclidean`` is easyfsl's, the non-squared
  ``cdist``, and protonet's default since 2026-12-01; ``sqeuclidean`` the default before) and/or
  ``--val-fraction 0`` (no validation split: all 185 training characters train, as in easyfsl, and the
  last step's weights are kept instead of the best validation checkpoint's); ``-sep`` rows also pass support
  and queries through the network in two batch-norm batches (protonet's ``separate_passes``), as easyfsl
  does (``fewshot-sep``: the defaults otherwise);
- ``easyfsl``: easyfsl 1.5.0's ``PrototypicalNetworks`` trained by ``benchmarks/peers/easyfsl_within.py``
  in the peers' environment (the procedure of ``../shared/anchors/anchor_protonet_easyfsl.py``);
  ``easyfsl-sqeuclidean`` scores it with squared distances instead.

Test: the same episodes for every row, written once to ``OUT/episodes.pt`` (class and image indices and the
test images as fewshot loads them; the peer script checks that its own loader gives the same pixels) and
read by both sides. ``within``: 20-way 1-shot 15-query, all 20 classes of a task from one alphabet (drawn by
fewshot's ``same_group`` sampler; of Korean's 40 and Tagalog's 17 characters only Korean has 20, so every
within-alphabet task is Korean); ``mixed``: 20-way 1-shot from all 57 test characters. Batch norm uses its
running statistics (``eval()``) on both sides. Accuracy is mean ± 1.96 sigma / sqrt(n) over episodes; the
difference to easyfsl is paired (per episode, same tasks). ``--seed`` seeds training only: the test episodes
are seed 0's whatever it is, so rows trained with other seeds stay paired; the table names each row's seed
(a results file may hold rows of several seeds beside each other, one per key). With one output folder per
seed, ``--across OUT0,OUT1,...`` prints the ``--rows`` of all of them side by side: each seed's accuracy, their
mean and range, and the paired difference to easyfsl of the same seed.

usage: python benchmarks/within_alphabet.py [--episodes 2000] [--seed 0] [--test-episodes 1000]
       [--rows easyfsl,fewshot,...] [--out /tmp/bench/within] [--fresh]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import torch

from common import (OMNIGLOT, PEERS_PYTHON, TEST_ALPHABETS, RowResults, add_row_options, drive_rows, exit_if_failed,
                    table)

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peers" / "easyfsl_within.py"
#: row key -> (distance, validation share of the training classes, support and queries in separate
#: batch-norm passes) for fewshot rows; None: fewshot's default
FEWSHOT_ROWS = {
    "fewshot": (None, None, False),
    "fewshot-sqeuclidean": ("sqeuclidean", None, False),
    "fewshot-euclidean": ("euclidean", None, False),
    "fewshot-noval": (None, 0.0, False),
    "fewshot-euclidean-noval": ("euclidean", 0.0, False),
    "fewshot-sqeuclidean-noval": ("sqeuclidean", 0.0, False),
    # every procedural difference from easyfsl removed: also support and queries in two batch-norm batches
    "fewshot-euclidean-noval-sep": ("euclidean", 0.0, True),
    # the defaults (validation share, best checkpoint) with support and queries in two batch-norm batches
    "fewshot-sep": (None, None, True),
}
PEER_ROWS = {"easyfsl": "euclidean", "easyfsl-sqeuclidean": "sqeuclidean"}
DEFAULT_ROWS = ("easyfsl", "fewshot", "fewshot-euclidean", "fewshot-noval", "fewshot-euclidean-noval")
TESTS = {"within": 1.0, "mixed": 0.0}       # test name -> same_group probability
WAYS, SHOTS, QUERIES = 20, 1, 15


def write_episodes(path: Path, data: str, n: int) -> None:
    """The shared test episodes: for each test of :data:`TESTS`, ``classes [n, WAYS]`` (indices into
    ``names``) and ``index [n, WAYS, SHOTS + QUERIES]`` (positions of the images within their class, support
    first), drawn by fewshot's sampler (seed 0), and the test images ``[classes, 20, 1, 28, 28]``."""
    import fewshot as fs
    from fewshot.data.images import to_float
    test = fs.data.omniglot(data, split="small").split_by_group(TEST_ALPHABETS)[1]
    if not bool((test.counts == test.counts[0]).all()):
        raise SystemExit("every test character needs the same number of drawings")
    out = {"names": list(test.names), "groups": list(test.groups), "ways": WAYS, "shots": SHOTS,
           "queries": QUERIES,
           "images": to_float(test.data).view(len(test), int(test.counts[0]), *test.image_shape)}
    for name, p in TESTS.items():
        s = fs.episodes(test, WAYS, SHOTS, QUERIES, seed=0, same_group=p)
        idx, cls = s._indices(n)            # flat image indices [n, WAYS, S+Q], classes [n, WAYS]
        out[name] = {"classes": cls, "index": idx - s.offsets[cls].unsqueeze(-1)}
    torch.save(out, path)


def evaluate_on(method, episodes: dict, chunk: int = 4) -> dict:
    """Per-episode accuracy (%) of a fewshot method on every test of the shared episode file."""
    method.eval()
    images = episodes["images"]
    res = {}
    k = episodes["shots"]
    for name in TESTS:
        cls, idx = episodes[name]["classes"], episodes[name]["index"]
        accs = []
        with torch.no_grad():
            for i in range(0, len(cls), chunk):
                c, j = cls[i:i + chunk], idx[i:i + chunk]
                x = images[c.unsqueeze(-1), j]                      # [B, N, S+Q, C, H, W]
                B, N = x.shape[:2]
                sx, qx = x[:, :, :k].flatten(1, 2), x[:, :, k:].flatten(1, 2)
                labels = torch.arange(N)
                sy = labels.repeat_interleave(k).expand(B, -1)
                qy = labels.repeat_interleave(qx.shape[1] // N).expand(B, -1)
                logits = method.predict(sx, sy, qx, ways=N)
                accs += ((logits.argmax(-1) == qy).float().mean(1) * 100).tolist()
        res[name] = accs
    return res


def run_row(key: str, a) -> dict:
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    episodes_file = out / "episodes.pt"
    t0 = time.time()
    if key in PEER_ROWS:
        res_file = out / f"{key}.json"
        p = subprocess.run([str(PEERS_PYTHON), str(PEER_SCRIPT), str(a.episodes), str(a.seed), str(episodes_file),
                            str(res_file), PEER_ROWS[key], str(Path(a.data))], capture_output=True, text=True)
        print(p.stdout + p.stderr, flush=True)
        if p.returncode:
            raise SystemExit(f"{PEER_SCRIPT.name} failed")
        r = json.loads(res_file.read_text())
        return {"key": key, "episodes": a.episodes, "seed": a.seed, "train_s": r["train_s"],
                "wall_s": round(time.time() - t0), "acc": r["acc"], "pixels_max_diff": r["pixels_max_diff"]}
    import fewshot as fs
    distance, val, separate = FEWSHOT_ROWS[key]
    cfg = fs.RunConfig(method="protonet", data=str(a.data), split="group:" + ",".join(TEST_ALPHABETS),
                       rotations=True, precision="fp32", seed=a.seed)
    cfg.train.episodes = a.episodes
    if distance is not None:
        cfg.options["distance"] = distance
    if val is not None:
        cfg.val_fraction = val
    if separate:
        cfg.options["separate_passes"] = True
    run = fs.fit(cfg, out / key, progress=False, overwrite=True)
    acc = evaluate_on(run.method, torch.load(episodes_file, weights_only=True))
    return {"key": key, "episodes": a.episodes, "seed": a.seed, "train_s": round(run.train_result.train_time_s),
            "wall_s": round(time.time() - t0), "steps": run.train_result.steps,
            "checkpoint_step": int(run.checkpoint["step"]), "distance": run.method.config.distance,
            "val_fraction": run.config.val_fraction, "acc": acc}


def mean_ci(v: list) -> tuple:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(1.96 * t.std() / math.sqrt(len(t))) if len(t) > 1 else 0.0


def paired_difference(row: dict, peer: dict) -> tuple:
    """Mean and CI over the test episodes of ``row``'s within-alphabet accuracy minus ``peer``'s, episode by
    episode (both scored on the same episodes)."""
    return mean_ci([x - y for x, y in zip(row["acc"]["within"], peer["acc"]["within"])])


def seed_summary(folders: list, keys: list) -> str:
    """The rows of several output folders, one training seed each, side by side: per row key the
    within-alphabet accuracy of every seed, their mean and range, and the paired difference to the easyfsl
    row of the same seed where there is one. The folders must hold the same test episodes."""
    missing = [f for f in folders if not (Path(f) / "episodes.pt").exists()]
    if missing:
        raise SystemExit(f"--across: no episodes.pt (not an output folder of this script) in {', '.join(missing)}")
    episodes = {(Path(f) / "episodes.pt").read_bytes() for f in folders}
    if len(episodes) != 1:
        raise SystemExit(f"--across: the folders {', '.join(folders)} hold different test episodes")
    by = {}                                 # key -> {seed: row}
    for f in folders:
        for r in RowResults(Path(f) / "rows.jsonl").latest(keys, keys):
            by.setdefault(r["key"], {})[r.get("seed", 0)] = r
    peer = by.get("easyfsl", {})
    body = []
    for k in keys:
        seeds = dict(sorted(by.get(k, {}).items()))
        if not seeds:
            continue
        acc = {s: mean_ci(r["acc"]["within"]) for s, r in seeds.items()}
        means = [m for m, _ in acc.values()]
        diffs = [(s, paired_difference(r, peer[s])) for s, r in seeds.items() if k != "easyfsl" and s in peer]
        body.append([k, ", ".join(f"{s}: {m:.2f} ± {c:.2f}" for s, (m, c) in acc.items()),
                     f"{sum(means) / len(means):.2f}", f"{max(means) - min(means):.2f}" if len(means) > 1 else "-",
                     ", ".join(f"{s}: {m:+.2f} ± {c:.2f}" for s, (m, c) in diffs) or "-"])
    return table(body, ["row", "within-alphabet 20w1s by seed (%)", "mean over seeds", "range",
                        "minus easyfsl, same seed (paired)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=2000, help="training episodes of every row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help="comma-separated, from: " + ", ".join([*PEER_ROWS, *FEWSHOT_ROWS]))
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--across", default="",
                    help="comma-separated output folders of runs with other --seed: train nothing, print the "
                         "--rows of all of them side by side, seed by seed")
    add_row_options(ap, out="/tmp/bench/within", jobs=1, threads=2)
    a = ap.parse_args()
    keys = [k for k in a.rows.split(",") if k]
    bad = [k for k in keys if k not in FEWSHOT_ROWS and k not in PEER_ROWS]
    if bad:
        ap.error(f"unknown --rows {', '.join(bad)}")
    if a.across:
        print(seed_summary([f for f in a.across.split(",") if f], keys))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.row and (a.fresh or not (out / "episodes.pt").exists()):
        write_episodes(out / "episodes.pt", a.data, a.test_episodes)
    driven = drive_rows(__file__, a, keys, run_row, ["--episodes", str(a.episodes), "--seed", str(a.seed),
                                                     "--data", a.data, "--rows", a.rows])
    if driven is None:
        return
    results, failed = driven
    rows = results.latest(keys, keys)
    peer = next((r for r in rows if r["key"] == "easyfsl"), None)
    print(f"\n# training: {a.episodes} episodes of 60-way 5-shot 5-query, fp32 (seed: each row's); test: "
          f"{a.test_episodes} episodes each, 20-way 1-shot 15-query, Korean + Tagalog")
    body = []
    for r in rows:
        cells = [r["key"], r.get("seed", 0), r.get("distance", PEER_ROWS.get(r["key"], "")),
                 r.get("val_fraction", 0.0), f"{r.get('checkpoint_step', r['episodes'])}",
                 f"{r['train_s'] / 60:.1f}"]
        for t in TESTS:
            m, c = mean_ci(r["acc"][t])
            cells.append(f"{m:.2f} ± {c:.2f} ({100 - m:.2f} % errors)")
        if peer is not None and r is not peer:
            m, c = paired_difference(r, peer)
            cells.append(f"{m:+.2f} ± {c:.2f}")
        else:
            cells.append("")
        body.append(cells)
    print(table(body, ["row", "seed", "distance", "val share", "weights of step", "train min",
                       "within-alphabet 20w1s (%)", "mixed 20w1s (%)", "within: minus easyfsl (paired)"]))
    exit_if_failed(failed, a.out)


if __name__ == "__main__":
    main()
