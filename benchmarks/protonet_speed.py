"""Training speed of a Conv-4 prototypical network on 60-way 5-shot 5-query Omniglot episodes (CPU).

Measures, in one process and one run: the episode sampler alone, our training step in each memory
layout / precision, and (when ../shared/anchors' peer venv exists) easyfsl 1.5.0's PrototypicalNetworks
on the same Conv-4 and episode shape, so the speed claim is a ratio from the same machine and run.

Ours runs in this process after :func:`fewshot.parallel.tune_allocator`, as ``fewshot train`` on a CPU does;
the peer runs as users run it and, as a control, with the same glibc ``malloc`` settings
(``fewshot.parallel.MALLOC_ENV``; ``--no-control`` skips it).

``--isa avx2`` runs the whole measurement, the peer included, with ATen, oneDNN and MKL held to AVX2
(``common.ISA_ENV``): an AVX2-only CPU's code paths on a newer part.

usage: python benchmarks/protonet_speed.py [--steps 40] [--peer-episodes 200] [--isa native|avx2] [--no-peer]
       [--precisions fp32,bf16] [--repeats 1] [--no-control]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import (ISA_ENV, OMNIGLOT, TEST_ALPHABETS, machine, peer_protonet_train_speed, ratio_summary,
                    table, use_isa)

import fewshot as fs
from fewshot.models import set_channels_last
from fewshot.parallel import MALLOC_ENV, tune_allocator
from fewshot.precision import autocast, resolve_channels_last, resolve_precision


def sampler_speed(train, n: int = 3000) -> float:
    s = fs.episodes(train, 60, 5, 5, seed=0)
    for _ in range(50):
        s.sample()
    t = time.perf_counter()
    for _ in range(n):
        s.sample()
    return n / (time.perf_counter() - t)


def train_speed(train, precision: str, channels_last: bool, steps: int, warmup: int = 5) -> float:
    torch.manual_seed(0)
    s = fs.episodes(train, 60, 5, 5, seed=0)
    m = fs.methods.build("protonet", train.image_shape)
    set_channels_last(m, channels_last)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    dev = torch.device("cpu")
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        ep = s.sample()
        with autocast(dev, precision):
            loss, _ = m.loss(ep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t)


def ratio_to(values: list, peers: list) -> str:
    """Median ratio of each round's value to that round's peer, with the range over rounds."""
    return ratio_summary([v / p for v, p in zip(values, peers)], "x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--peer-episodes", type=int, default=200, help="must be a multiple of 200")
    ap.add_argument("--data", default=str(OMNIGLOT))
    ap.add_argument("--isa", choices=list(ISA_ENV), default="native",
                    help="instruction set ATen/oneDNN/MKL may use, for every process of the run (peer included)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-control", action="store_true", help="skip easyfsl under fewshot's malloc settings")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of the peer and every configuration, in turn (medians; ratios within a round)")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="precisions to time (bf16 without bf16 units takes minutes a step: leave it out there)")
    a = ap.parse_args()
    use_isa(a.isa)
    tuned = tune_allocator()        # what training on a CPU does
    data = fs.data.omniglot(a.data, split="small")
    train, _ = data.split_by_group(TEST_ALPHABETS)
    train = train.with_rotations()
    print(f"machine: {machine()}; fewshot's malloc settings {'applied' if tuned else 'not applied'}", flush=True)
    rows = []
    sps = sampler_speed(train)
    rows.append(["sampler only (60w5s5q, uint8 -> fp32)", f"{sps:.0f}", "", ""])
    print(f"sampler: {sps:.0f} episodes/s", flush=True)
    cpu = torch.device("cpu")
    auto = (resolve_precision("auto", cpu), resolve_channels_last("auto", cpu))
    combos = [(p, c) for p in a.precisions.split(",") for c in (False, True)]
    peers, controls, ours = [], [], {k: [] for k in combos}
    for rnd in range(a.repeats):          # rounds: the peer, then each of ours; ratios within a round
        peers.append(None if a.no_peer else peer_protonet_train_speed(a.peer_episodes))
        if peers[-1] is not None:
            print(f"round {rnd + 1}: peer easyfsl: {peers[-1]:.2f} episodes/s", flush=True)
            if not a.no_control:
                controls.append(peer_protonet_train_speed(a.peer_episodes, MALLOC_ENV))
                print(f"round {rnd + 1}: peer easyfsl, fewshot's malloc settings: {controls[-1]:.2f} episodes/s",
                      flush=True)
        for prec, cl in combos:
            ours[(prec, cl)].append(train_speed(train, prec, cl, a.steps))
            print(f"round {rnd + 1}: ours {prec} cl={cl}: {ours[(prec, cl)][-1]:.2f} episodes/s", flush=True)
    if peers[0] is not None:
        rows.append([f"easyfsl 1.5.0 PrototypicalNetworks, fp32 ({a.peer_episodes} episodes)",
                     f"{statistics.median(peers):.2f}", "1.00x", "peer, same run"])
    if controls:
        rows.append(["easyfsl 1.5.0, fewshot's malloc settings (control)", f"{statistics.median(controls):.2f}",
                     ratio_to(controls, peers), "peer, same run"])
    for prec, cl in combos:
        v = ours[(prec, cl)]
        ratio = ratio_to(v, peers) if peers[0] is not None else "n/a"
        rows.append([f"fewshot protonet, {prec}, {'channels-last' if cl else 'NCHW'}",
                     f"{statistics.median(v):.2f}", ratio, "auto on this CPU" if (prec, cl) == auto else ""])
    print()
    print(table(rows, ["what (Conv-4, 60-way 5-shot 5-query, Omniglot 28x28)", f"episodes/s (median of {a.repeats})",
                       "vs easyfsl (same round; range)", "note"]))


if __name__ == "__main__":
    main()
