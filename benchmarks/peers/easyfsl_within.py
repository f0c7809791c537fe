"""Peer side of benchmarks/within_alphabet.py, run with the peers' Python (easyfsl 1.5.0): train easyfsl's
PrototypicalNetworks as ../shared/anchors/anchor_protonet_easyfsl.py does and score it on the shared episodes.

Training: the anchors' Omniglot loader (``omni.background``: small1 + small2, strokes = 1, 28x28 bilinear)
without Korean and Tagalog, the 90/180/270-degree rotations as new classes, 60-way 5-shot 5-query episodes
(support and queries through the backbone in two calls, as easyfsl's ``process_support_set`` and
``forward`` do), cross-entropy on the negative distances, Adam 1e-3, fp32; Conv-4 = 4 x [conv 3x3 padding 1,
batch norm, ReLU, max-pool 2], flattened (64 features). DISTANCE ``euclidean`` is easyfsl's own
(``-cdist``); ``sqeuclidean`` squares it, for the comparison with fewshot's default.
Test: ``eval()`` (running batch-norm statistics), every test of EPISODES_FILE (written by
within_alphabet.py with fewshot's images; the anchors' loader is checked to give the same pixels).

usage: python easyfsl_within.py TRAIN_EPISODES SEED EPISODES_FILE OUT_JSON [euclidean|sqeuclidean]
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ANCHORS, TEST_ALPHABETS  # noqa: E402

sys.path.insert(0, str(ANCHORS))
import omni  # noqa: E402
from easyfsl.methods import PrototypicalNetworks  # noqa: E402


class SquaredPrototypicalNetworks(PrototypicalNetworks):
    """easyfsl's prototypical network scored with squared Euclidean distances."""

    def l2_distance_to_prototypes(self, samples):
        return -torch.cdist(samples, self.prototypes).pow(2)


def conv4() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten())


def main() -> None:
    episodes, seed, ep_file, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    distance = sys.argv[5] if len(sys.argv) > 5 else "euclidean"
    torch.manual_seed(seed)
    np.random.seed(seed)
    test_eps = torch.load(ep_file, weights_only=True)
    x, names = omni.background()
    x = torch.from_numpy(x)
    test = torch.tensor([a in TEST_ALPHABETS for a, _ in names])
    # the shared file's test images are fewshot's; the anchors' loader must give the same pixels
    ours = {n: i for i, n in enumerate(test_eps["names"])}
    order = [ours[f"{a}/{c}"] for (a, c), t in zip(names, test.tolist()) if t]
    diff = float((x[test] - test_eps["images"][order].squeeze(2)).abs().max())
    if diff > 1.5 / 255:
        raise SystemExit(f"the anchors' loader and fewshot's differ by {diff} on the test images")
    train = x[~test]
    train = torch.cat([torch.rot90(train, k, dims=(2, 3)) for k in range(4)])   # rotations = new classes
    cls_model = PrototypicalNetworks if distance == "euclidean" else SquaredPrototypicalNetworks
    model = cls_model(conv4(), use_softmax=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ways, shots, queries = 60, 5, 5
    ys = torch.arange(ways).repeat_interleave(shots)
    yq = torch.arange(ways).repeat_interleave(queries)
    t0 = time.time()
    model.train()
    for ep in range(episodes):
        cls = torch.randperm(len(train))[:ways]
        idx = torch.stack([torch.randperm(train.shape[1])[:shots + queries] for _ in range(ways)])
        imgs = train[cls[:, None], idx].unsqueeze(2)                    # [W, S+Q, 1, 28, 28]
        model.process_support_set(imgs[:, :shots].reshape(-1, 1, 28, 28), ys)
        loss = nn.functional.cross_entropy(model(imgs[:, shots:].reshape(-1, 1, 28, 28)), yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (ep + 1) % 100 == 0:
            print(f"ep {ep + 1} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()
    images, k = test_eps["images"], test_eps["shots"]
    acc = {}
    with torch.no_grad():
        for name in ("within", "mixed"):
            accs = []
            for c, j in zip(test_eps[name]["classes"], test_eps[name]["index"]):
                e = images[c.unsqueeze(-1), j]                             # [N, S+Q, 1, 28, 28]
                n = e.shape[0]
                model.process_support_set(e[:, :k].flatten(0, 1), torch.arange(n).repeat_interleave(k))
                q = e[:, k:].flatten(0, 1)
                pred = model(q).argmax(1)
                accs.append(float((pred == torch.arange(n).repeat_interleave(q.shape[0] // n)).float().mean()) * 100)
            acc[name] = accs
    out.write_text(json.dumps({"train_s": round(train_s, 1), "distance": distance, "pixels_max_diff": diff,
                               "acc": acc}))


if __name__ == "__main__":
    main()
