"""Peer side of ``benchmarks/gpu.py``: easyfsl 1.5.0 and learn2learn 0.2.0 on the GPU, the shapes of our rows.

Runs in the peers' environment (``$PEERS_VENV``), never imports fewshot. The images are random uint8 tensors
of Omniglot's shape (28x28 grey, 4 x 242 classes of 20 images, as the background small sets with rotations),
kept on the GPU; the speed of these steps does not depend on the pixels.

usage: python gpu_peers.py protonet-conv4|maml-conv4-2nd|maml-conv4-1st STEPS [DATA]
Prints one JSON line: episodes_per_s or tasks_per_s, peak_gpu_mb.
"""
import json
import sys
import time

import torch
import torch.nn as nn

what, steps = sys.argv[1], int(sys.argv[2])
dev = torch.device("cuda")
torch.manual_seed(0)
images = torch.randint(0, 256, (4 * 242, 20, 1, 28, 28), dtype=torch.uint8, device=dev)


def task(ways, shots, queries):
    cls = torch.randperm(len(images), device=dev)[:ways]
    idx = torch.rand(ways, 20, device=dev).argsort(1)[:, :shots + queries]
    x = images[cls[:, None], idx].float().div_(255)
    ys = torch.arange(ways, device=dev).repeat_interleave(shots)
    yq = torch.arange(ways, device=dev).repeat_interleave(queries)
    return x[:, :shots].reshape(-1, 1, 28, 28), ys, x[:, shots:].reshape(-1, 1, 28, 28), yq


def conv4(outputs=None):
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    layers = [block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten()]
    return nn.Sequential(*layers, *([nn.Linear(64, outputs)] if outputs else [])).to(dev)


if what == "protonet-conv4":
    from easyfsl.methods import PrototypicalNetworks
    model = PrototypicalNetworks(conv4(), use_softmax=False).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        xs, ys, xq, yq = task(60, 5, 5)
        model.process_support_set(xs, ys)
        loss = nn.functional.cross_entropy(model(xq), yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch, unit = 1, "episodes_per_s"
else:
    import learn2learn as l2l
    maml = l2l.algorithms.MAML(conv4(5), lr=0.4, first_order=what.endswith("1st"))
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    batch, unit = 32, "tasks_per_s"

    def step():
        opt.zero_grad()
        for _ in range(batch):
            xs, ys, xq, yq = task(5, 1, 15)
            learner = maml.clone()
            learner.adapt(lossf(learner(xs), ys))
            lossf(learner(xq), yq).div(batch).backward()
        opt.step()

for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
for _ in range(steps):
    step()
torch.cuda.synchronize()
dt = time.perf_counter() - t
print(json.dumps({"peer": what, unit: round(steps * batch / dt, 2),
                  "peak_gpu_mb": torch.cuda.max_memory_allocated() // 2 ** 20}))
