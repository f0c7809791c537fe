"""Evaluation from cached features against the plain path: the same episodes, the same numbers, the time.

A prototypical network (Conv-4, 64 channels, random weights: the accuracy is chance, the point is the time
and the equality) on a synthetic data set of mini-ImageNet's test-split shape (20 classes x 600 images,
3x84x84 uint8), 5-way 5-shot 15-query episodes, one torch thread. The plain path pushes every episode's
images through the network (100 per episode); the cached one embeds the 12 000 images once and scores
every episode from the stored features (``fewshot.evaluate.evaluate(..., cache=True)``). Both use
``--chunk`` tasks per forward pass. Printed: seconds of each, whether the per-episode accuracies are
identical, the loss difference and the raw-pixel 1-NN baseline of each.

usage: python benchmarks/eval_cache_speed.py [--episodes 200] [--chunk 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=5, help="tasks per forward pass (both paths)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from fewshot import methods
    from fewshot.data.dataset import ClassDataset
    from fewshot.episodes import EpisodeSampler
    from fewshot.evaluate import evaluate
    print(f"# {machine()}", flush=True)
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 256, (600, 3, 84, 84), generator=g, dtype=torch.uint8) for _ in range(20)]
    ds = ClassDataset.from_class_tensors(parts, [f"c{i}" for i in range(20)], source="synthetic")
    torch.manual_seed(0)
    m = methods.build("protonet", ds.image_shape).eval()
    res = {}
    for cache in (False, True):
        t = time.perf_counter()
        r = evaluate(m, EpisodeSampler(ds, 5, 5, 15, seed=0), a.episodes, chunk=a.chunk, progress=False, cache=cache)
        res[cache] = (time.perf_counter() - t, r)
        print(f"cache={cache}: {res[cache][0]:.1f} s, {r.short()}, loss {r.loss:.6f}, baseline {r.baseline:.2f}",
              flush=True)
    plain, cached = res[False][1], res[True][1]
    print(f"{a.episodes} episodes, chunk {a.chunk}: {res[False][0] / res[True][0]:.2f}x faster cached; identical "
          f"accuracies: {plain.accuracies == cached.accuracies}; loss difference {abs(plain.loss - cached.loss):.1e}; "
          f"same baseline: {plain.baseline == cached.baseline}")


if __name__ == "__main__":
    main()
