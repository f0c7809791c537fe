"""Sampling episodes from a memory-mapped cache several times larger than the memory a process may use.

Writes a synthetic tiered-ImageNet-shaped cache (608 classes of 84x84 RGB uint8 images, ``--size-gb`` of
pixels) with :func:`fewshot.data.mapped.write_cache`, then, in a child process whose address space is limited
to ``--budget-gb`` (``RLIMIT_AS``: every mapping counts, so the file cannot even be mapped whole), draws
episodes from it with the :class:`~fewshot.episodes.EpisodeSampler` (fixed N-way K-shot) and the
:class:`~fewshot.metadataset.MetaDatasetSampler` (variable ways and shots) and reports episodes/s and the
child's peak resident set (``VmHWM``). Twice: "cold", the file evicted from the page cache first
(``posix_fadvise``, so images come from disk), and "warm", the file read once into the page cache (which is
the kernel's, not the process's, memory). The child then tries to read the set whole (``ds.data``), which the
limit refuses. ``--data PATH`` measures a real data set instead (e.g. Tiny-ImageNet, 200 classes x 550
images, resized to ``--size``): it is decoded once by ``fewshot.data.load(PATH, mmap=True)`` into a cache
under ``--dir``, which the children open the same way (checked against the source). Last, without a limit, the same sampler on the first ``--reference-gb`` of classes loaded in
memory and memory-mapped (both warm), to show what reading from the file costs per episode. The cache file is
deleted at the end unless ``--keep``.

usage: nice -n 10 python benchmarks/mmap_sampler.py [--size-gb 4] [--budget-gb 2] [--episodes 300]
       [--ways 20 --shots 5 --queries 15] [--dir /tmp] [--data FOLDER --size 84] [--reference-gb 1] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, table

SHAPE = (3, 84, 84)
CLASSES = 608


def write_synthetic(path: Path, size_gb: float) -> tuple:
    """A cache of ``CLASSES`` classes with ~``size_gb`` GB of images; each image a cheap pattern of its
    class and index (writing stays disk-bound). Returns (images, bytes, seconds)."""
    from fewshot.data.images import Preprocess
    from fewshot.data.mapped import Plan, write_cache
    row = int(np.prod(SHAPE))
    per = max(1, int(size_gb * 1e9) // row // CLASSES)
    counts = [per] * CLASSES
    base = np.random.default_rng(0).integers(0, 256, (256, *SHAPE), dtype=np.uint8)

    def fill(write):
        for c in range(CLASSES):
            for i in range(0, per, 256):
                n = min(256, per - i)
                chunk = base[:n].copy()
                chunk[:, 0, 0, 0] = c % 256
                chunk[:, 0, 0, 1] = c // 256
                write(chunk)
    t = time.perf_counter()
    plan = Plan((sum(counts), *SHAPE), counts, [f"c{k:03d}" for k in range(CLASSES)], None,
                Preprocess(size=SHAPE[1:], channels=3), "synthetic", fill)
    write_cache(path, "benchmark", plan)
    return sum(counts), path.stat().st_size, time.perf_counter() - t


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_data(a):
    """The memory-mapped data set to sample: the synthetic cache, or ``--data`` through ``fewshot.data.load``."""
    from fewshot.data import load
    from fewshot.data.mapped import open_cache
    if a.data:
        return load(a.data, size=a.size, channels=3, mmap=True, cache=Path(a.child))
    return open_cache(a.child, "benchmark")


def child(a) -> None:
    """Runs under RLIMIT_AS: sample, time, report JSON on stdout."""
    import torch
    torch.set_num_threads(1)
    from fewshot.episodes import EpisodeSampler
    from fewshot.metadataset import MetaDatasetSampler
    out = {"rss_after_import_mb": peak_rss_mb()}
    ds = open_data(a)
    assert ds.memory_mapped
    rows = []
    for name, s in (("EpisodeSampler", EpisodeSampler(ds, a.ways, a.shots, a.queries, seed=0)),
                    ("MetaDatasetSampler", MetaDatasetSampler(ds, seed=0))):
        n_img = 0
        t = time.perf_counter()
        for _ in range(a.episodes):
            ep = s.sample()
            n_img += ep.support_x.shape[1] + ep.query_x.shape[1]
        dt = time.perf_counter() - t
        rows.append({"sampler": name, "episodes_per_s": a.episodes / dt, "images_per_episode": n_img / a.episodes,
                     "MB_per_s": n_img * int(np.prod(ds.image_shape)) / dt / 1e6, "peak_rss_mb": peak_rss_mb()})
    out["rows"] = rows
    try:
        whole = ds.data
        out["whole"] = f"loaded {tuple(whole.shape)} (the limit did not stop it)"
    except (MemoryError, RuntimeError) as e:
        out["whole"] = f"refused: {e.__class__.__name__}"
    print(json.dumps(out))


def reference(gb: float, a) -> list:
    """[(where, episodes/s, GB)] of the EpisodeSampler on the first ``gb`` GB of classes, in memory and mapped
    (the in-memory uint8 set converted to floats per episode, as the sampler does above 1 GiB of floats)."""
    from fewshot.data.dataset import ClassDataset
    from fewshot.episodes import EpisodeSampler
    ds = open_data(a)
    per_class = int(ds.counts[0]) * int(np.prod(ds.image_shape))
    sub = ds.subset(range(max(a.ways, min(len(ds), int(gb * 1e9) // per_class))))
    mem = ClassDataset(sub.data, sub.counts, sub.names)
    out = []
    for where, d in (("in memory", mem), ("memory-mapped", sub)):
        s = EpisodeSampler(d, a.ways, a.shots, a.queries, seed=0)
        for _ in range(5):
            s.sample()
        t = time.perf_counter()
        for _ in range(a.episodes):
            s.sample()
        out.append((where, a.episodes / (time.perf_counter() - t), sub.num_images * int(np.prod(ds.image_shape)) / 1e9))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--budget-gb", type=float, default=2.0, help="RLIMIT_AS of the sampling process")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--ways", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--reference-gb", type=float, default=1.0, help="size of the in-memory comparison")
    ap.add_argument("--data", help="a real data set (folder) instead of the synthetic cache")
    ap.add_argument("--size", type=int, default=84, help="image size for --data")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    if a.data:
        import shutil
        cache_dir = Path(a.dir) / f"fewshot-mmap-bench-{os.getpid()}"
        a.child = str(cache_dir)
        t = time.perf_counter()
        ds = open_data(a)
        secs = time.perf_counter() - t
        (path,) = list(cache_dir.glob("*.fsmm"))
        size, n = path.stat().st_size, ds.num_images
        print(f"decoded {a.data} into {path}: {len(ds)} classes, {n} images of {ds.image_shape}, "
              f"{size / 1e9:.2f} GB in {secs:.0f} s", flush=True)
        del ds
        remove = lambda: shutil.rmtree(cache_dir, ignore_errors=True)     # noqa: E731
    else:
        path = Path(a.dir) / f"fewshot-mmap-bench-{os.getpid()}.fsmm"
        remove = lambda: path.unlink(missing_ok=True)                     # noqa: E731
    try:
        if not a.data:
            n, size, secs = write_synthetic(path, a.size_gb)
            print(f"wrote {path}: {n} images of {SHAPE}, {size / 1e9:.2f} GB in {secs:.1f} s "
                  f"({size / secs / 1e9:.2f} GB/s)", flush=True)
            a.child = str(path)
        limit = int(a.budget_gb * (1 << 30))

        def limited():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", a.child, "--episodes", str(a.episodes),
               "--ways", str(a.ways), "--shots", str(a.shots), "--queries", str(a.queries)]
        if a.data:
            cmd += ["--data", a.data, "--size", str(a.size)]
        results = {}
        for cache_state, prepare in (("cold", evict), ("warm", warm)):
            prepare(path)
            r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limited, cwd=Path(__file__).parent)
            if r.returncode != 0:
                sys.exit(f"child failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
            results[cache_state] = json.loads(r.stdout.strip().splitlines()[-1])
        import torch
        torch.set_num_threads(1)
        ref = reference(a.reference_gb, a) if a.reference_gb > 0 else []
    finally:
        if not a.keep:
            remove()
    print(f"{machine()}; cache {size / 1e9:.2f} GB, the sampling process's address space limited (RLIMIT_AS) to "
          f"{a.budget_gb:g} GiB: the cache is {size / limit:.1f}x the limit; {a.episodes} episodes per sampler")
    print(f"child peak RSS right after importing torch + fewshot: {results['cold']['rss_after_import_mb']:.0f} MB")
    shape = {"EpisodeSampler": f"{a.ways}-way {a.shots}-shot {a.queries}-query", "MetaDatasetSampler": "5-50 ways"}
    print(table([[st, r["sampler"], shape[r["sampler"]], f"{r['images_per_episode']:.0f}",
                  f"{r['episodes_per_s']:.1f}", f"{r['MB_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}"]
                 for st, res in results.items() for r in res["rows"]],
                ["page cache", "sampler", "episodes", "images/episode", "episodes/s", "MB/s read",
                 "peak RSS MB (so far)"]))
    print(f"reading the whole set (ds.data) in the same process: {results['cold']['whole']}")
    for where, eps, gb in ref:
        print(f"no limit, {gb:.2f} GB of its classes {where} (warm): EpisodeSampler {eps:.1f} episodes/s")
    if not a.keep:
        print(f"deleted {path}")


if __name__ == "__main__":
    main()
