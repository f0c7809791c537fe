"""Siamese network: losses and threshold calibration against hand numbers, the pair/triplet samplers,
nearest-support one-shot prediction, the Reptile meta-gradient, the CLI end to end, and real learning."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fewshot as fs
from fewshot import methods
from fewshot.data.pairs import PairSampler, TripletSampler
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.methods.siamese import (best_threshold, contrastive_loss, nearest_support_logits, pair_energy,
                                     triplet_loss)

from conftest import make_synthetic, strokes, support_folder
from test_cli import run_cli


# ------------------------------------------------------------------------------------------ losses
def test_contrastive_loss_at_and_beyond_the_margin_by_hand() -> None:
    # genuine pair at E=0.3: 0.3^2; impostors at E=0.3 (inside the margin): (1-0.3)^2, at E=1.0 (exactly at
    # the margin): 0, at E=1.5 (beyond): 0
    e = torch.tensor([0.3, 0.3, 1.0, 1.5], requires_grad=True)
    y = torch.tensor([1, 0, 0, 0])
    loss = contrastive_loss(e, y, margin=1.0)
    assert float(loss.detach()) == pytest.approx((0.09 + 0.49 + 0 + 0) / 4)
    loss.backward()
    # d/dE: genuine 2E/4, impostor inside -2(m-E)/4, at and beyond the margin 0
    assert e.grad.tolist() == pytest.approx([0.15, -0.35, 0.0, 0.0])
    # a wider margin m=2 pulls the E=1.5 impostor in: (2-1.5)^2
    assert float(contrastive_loss(torch.tensor([1.5]), torch.tensor([0]), margin=2.0)) == pytest.approx(0.25)


def test_triplet_loss_at_and_beyond_the_margin_by_hand() -> None:
    d_pos = torch.tensor([0.2, 2.0, 0.5, 0.1])
    d_neg = torch.tensor([1.5, 1.0, 1.5, 0.6])
    # 0.2-1.5+1 < 0 -> 0; 2-1+1 = 2; 0.5-1.5+1 = 0 (exactly at the margin); 0.1-0.6+1 = 0.5
    assert float(triplet_loss(d_pos, d_neg, 1.0)) == pytest.approx((0 + 2 + 0 + 0.5) / 4)


def test_pair_energy_euclidean_and_cosine_by_hand() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert pair_energy(a, b).tolist() == pytest.approx([5.0, math.sqrt(5.0)])
    assert pair_energy(a[1:], b[1:], "cosine").tolist() == pytest.approx([1.0])   # orthogonal: 1 - 0


def test_method_objective_matches_numpy_loops() -> None:
    """The loss the trainer sees, on given embeddings, equals a plain loop over the pairs/triplets."""
    g = torch.Generator().manual_seed(3)
    za, zp, zn = (torch.randn(6, 4, generator=g) * 0.4 for _ in range(3))
    for kind in ("contrastive", "triplet"):
        m = methods.build("siamese", (4,), loss=kind, backbone="mlp", mlp_hidden=[8], embedding=4)
        loss, metrics = m._objective(za, zp, zn)
        A, P, N = za.numpy().astype(np.float64), zp.numpy(), zn.numpy()
        terms = []
        for i in range(6):
            dp = math.sqrt(sum((A[i, j] - P[i, j]) ** 2 for j in range(4)))
            dn = math.sqrt(sum((A[i, j] - N[i, j]) ** 2 for j in range(4)))
            if kind == "contrastive":
                terms += [dp ** 2, max(1 - dn, 0) ** 2]
            else:
                terms.append(max(dp - dn + 1, 0))
        assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
        assert 0 <= metrics["triplet_acc"] <= 1


# ------------------------------------------------------------------------------------------ samplers
def test_pair_sampler_is_balanced_labelled_and_seeded(synthetic: ClassDataset) -> None:
    labels = synthetic.labels()
    s = PairSampler(synthetic, 200, seed=5)
    p = s.sample()
    assert p.x1.shape == (200, 1, 12, 12) and p.x1.dtype == torch.float32
    assert int(p.same.sum()) == 100                                       # exactly balanced
    assert torch.equal(labels[p.index1], p.class1) and torch.equal(labels[p.index2], p.class2)
    assert torch.equal(p.same.bool(), p.class1 == p.class2)               # the label is the truth
    genuine = p.same.bool()
    assert bool((p.index1[genuine] != p.index2[genuine]).all())            # two different images
    assert torch.equal(p.x1, synthetic.data[p.index1].float() / 255)
    assert torch.equal(p.x2, synthetic.data[p.index2].float() / 255)
    again = PairSampler(synthetic, 200, seed=5).sample()
    assert torch.equal(again.index1, p.index1) and torch.equal(again.index2, p.index2)
    other = PairSampler(synthetic, 200, seed=6).sample()
    assert not torch.equal(other.index1, p.index1)
    many = torch.cat([s.sample().class2 for _ in range(20)])
    assert set(many.tolist()) == set(range(len(synthetic)))               # every class gets drawn


def test_triplet_sampler_labels(synthetic: ClassDataset) -> None:
    labels = synthetic.labels()
    t = TripletSampler(synthetic, 300, seed=1).sample()
    assert t.anchor.shape == t.positive.shape == t.negative.shape == (300, 1, 12, 12)
    assert torch.equal(labels[t.anchor_index], t.anchor_class)
    assert torch.equal(labels[t.positive_index], t.anchor_class)
    assert torch.equal(labels[t.negative_index], t.negative_class)
    assert bool((t.anchor_class != t.negative_class).all())
    assert bool((t.anchor_index != t.positive_index).all())


def test_samplers_reject_too_small_data() -> None:
    ims = [torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 1, 4, 4, dtype=torch.uint8)]
    small = ClassDataset.from_class_tensors(ims, ["a", "b"])
    with pytest.raises(FewshotError, match="class 'b' has 1 image"):
        PairSampler(small, 4)
    with pytest.raises(FewshotError, match="class 'b' has 1 image"):
        TripletSampler(small, 4)
    one = ClassDataset.from_class_tensors(ims[:1], ["a"])
    with pytest.raises(FewshotError, match="at least 2 classes"):
        PairSampler(one, 4)
    with pytest.raises(FewshotError, match="even"):
        PairSampler(make_synthetic(), 5)


def test_training_pairs_from_an_episode_are_correct(synthetic: ClassDataset) -> None:
    """Every example is an anchor once; its positive is another example of its way, its negative one of
    another way (so contrastive pairs are exactly half genuine, half impostor)."""
    ep = EpisodeSampler(synthetic, 4, 2, 3, batch=3, seed=0).sample()
    m = methods.build("siamese", synthetic.image_shape, backbone="faces")
    x, y, per_way = m._episode_layout(ep)
    assert x.shape == (3, 20, 1, 12, 12) and per_way == 5
    assert torch.equal(x[:, :2], ep.support_x[:, :2]) and torch.equal(x[:, 2:5], ep.query_x[:, :3])
    torch.manual_seed(0)
    pos, neg = m._partners(y, 4, per_way)
    idx = torch.arange(20).expand(3, -1)
    assert torch.equal(y.gather(1, pos), y) and bool((pos != idx).all())
    assert bool((y.gather(1, neg) != y).all())


# ------------------------------------------------------------------------------------------ calibration
def _brute_force_threshold(e, y):
    """Try every threshold between and around the energies; the first best (smallest) wins."""
    s = sorted(set(e))
    cands = [s[0] - 1.0] + [(a + b) / 2 for a, b in zip(s, s[1:])] + [s[-1] + 1.0]
    best = None
    for t in cands:
        acc = sum((ei <= t) == bool(yi) for ei, yi in zip(e, y)) / len(e)
        if best is None or acc > best[1]:
            best = (t, acc)
    return best


def test_threshold_calibration_picks_the_accuracy_maximising_threshold() -> None:
    e = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    y = [1, 1, 0, 1, 0, 0]
    t, acc = best_threshold(torch.tensor(e), torch.tensor(y))
    # hand: calling the two smallest "same" gets 5 of 6 right (the 0.4 genuine pair is the only mistake)
    assert t == pytest.approx(0.25) and acc == pytest.approx(5 / 6)
    assert (t, acc) == pytest.approx(_brute_force_threshold(e, y))
    # ties: equal energies cannot be split; all-impostor data puts the threshold below everything
    e2, y2 = [0.5, 0.5, 0.9, 0.2], [1, 0, 0, 1]
    assert best_threshold(torch.tensor(e2), torch.tensor(y2)) == pytest.approx(_brute_force_threshold(e2, y2))
    t3, acc3 = best_threshold(torch.tensor([0.3, 0.7]), torch.tensor([0, 0]))
    assert t3 < 0.3 and acc3 == 1.0
    g = torch.Generator().manual_seed(0)
    e4, y4 = torch.rand(40, generator=g), (torch.rand(40, generator=g) < 0.5).long()
    assert best_threshold(e4, y4) == pytest.approx(_brute_force_threshold(e4.tolist(), y4.tolist()))


def test_calibrate_stores_the_threshold_in_the_state_dict(synthetic: ClassDataset) -> None:
    torch.manual_seed(0)
    m = methods.build("siamese", synthetic.image_shape, backbone="faces", embedding=16)
    assert not m.calibrated
    with pytest.raises(FewshotError, match="not calibrated"):
        m.pair_metrics(synthetic, pairs=10)
    info = m.calibrate(synthetic, pairs=100)
    assert m.training                                              # calibration leaves the mode as it was
    m.eval()
    e, y = m.pair_energies(PairSampler(synthetic, 2, seed=0), 100)   # the same pairs (same seed)
    assert info["threshold"] == pytest.approx(best_threshold(e, y)[0])
    assert float(m.state_dict()["threshold"]) == pytest.approx(info["threshold"])
    m2 = methods.build("siamese", synthetic.image_shape, backbone="faces", embedding=16)
    m2.load_state_dict(m.state_dict())
    assert m2.calibrated and float(m2.threshold) == pytest.approx(info["threshold"])


# ------------------------------------------------------------------------------------------ one-shot
def test_predict_is_nearest_support_not_class_mean() -> None:
    m = methods.build("siamese", (2,), backbone="mlp", mlp_hidden=[4], embedding=2)
    m.backbone = nn.Identity()                       # embeddings = the inputs: hand-checkable
    # class 0: a far cloud with one point near the query; class 1: a tight pair whose MEAN is nearer
    sx = torch.tensor([[[0.0, 0.0], [10.0, 10.0], [2.0, 0.0], [2.0, 0.2]]])
    sy = torch.tensor([[0, 0, 1, 1]])
    qx = torch.tensor([[[0.5, 0.0], [2.1, 0.1]]])
    logits = m.predict(sx, sy, qx, 2)
    assert logits.shape == (1, 2, 2)
    for i in range(2):
        for c in range(2):
            d = min(math.dist(qx[0, i].tolist(), sx[0, s].tolist()) for s in range(4) if int(sy[0, s]) == c)
            assert float(logits[0, i, c]) == pytest.approx(-d, abs=1e-5)
    assert logits.argmax(-1).tolist() == [[0, 1]]    # class 0's mean (5, 5) is far, its nearest point is not
    e = torch.tensor([[[1.0, 2.0, 3.0]]])
    with pytest.raises(FewshotError, match="at least one support example"):
        nearest_support_logits(e, torch.tensor([[0, 0, 0]]), 2)


# ------------------------------------------------------------------------------------------ Reptile
def test_reptile_surrogate_gradient_is_theta_minus_adapted_theta() -> None:
    vec = ClassDataset.from_class_tensors([torch.rand(4, 1, 1, 3) for _ in range(3)], ["a", "b", "c"])
    ep = EpisodeSampler(vec, 3, 1, 3, seed=0).sample()
    m = methods.build("siamese", (1, 1, 3), backbone="mlp", mlp_hidden=[5], embedding=2, train="reptile",
                      inner_steps=3, inner_lr=0.1, loss="triplet")
    ref = copy.deepcopy(m.backbone)
    theta = {k: p.detach().clone() for k, p in m.backbone.named_parameters()}
    torch.manual_seed(7)
    loss, metrics = m.loss(ep)
    loss.backward()
    # the same domain batch, then 3 plain SGD steps on an independent copy with torch.optim.SGD
    torch.manual_seed(7)
    x, y, per_way = m._episode_layout(ep)
    xa, xp, xn = m.domain_batches(x[0], y[0], 3, per_way)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        z = ref(torch.cat([xa, xp, xn]))
        za, zp, zn = z.chunk(3)
        lo = triplet_loss(pair_energy(za, zp), pair_energy(za, zn), 1.0)
        opt.zero_grad()
        lo.backward()
        opt.step()
    adapted = dict(ref.named_parameters())
    for k, p in m.backbone.named_parameters():
        assert torch.allclose(p.grad, theta[k] - adapted[k].detach(), atol=1e-6), k
    assert metrics["inner_end"] < metrics["inner_start"]
    # the trainer's SGD at lr epsilon then performs theta + epsilon (theta' - theta)
    eps = 0.5
    torch.optim.SGD(m.parameters(), lr=eps).step()
    for k, p in m.backbone.named_parameters():
        assert torch.allclose(p.detach(), theta[k] + eps * (adapted[k].detach() - theta[k]), atol=1e-6)


def test_bad_options_and_episodes_are_one_line_errors(synthetic: ClassDataset) -> None:
    m = methods.build("siamese", synthetic.image_shape, backbone="faces")
    with pytest.raises(FewshotError, match="at least 2 ways"):
        m.loss(EpisodeSampler(synthetic, 1, 1, 1).sample())
    with pytest.raises(FewshotError, match="shots \\+ queries >= 2"):
        m.loss(EpisodeSampler(synthetic, 3, 1, 0).sample())
    for opts, frag in (({"loss": "hinge"}, "unknown loss"), ({"train": "maml"}, "unknown train"),
                       ({"distance": "l1"}, "unknown distance"), ({"margin": 0.0}, "margin")):
        with pytest.raises(FewshotError, match=frag):
            methods.build("siamese", (1, 16, 16), **opts)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_train_eval_predict_plot(capsys, tmp_path: Path, image_root: Path) -> None:
    run = tmp_path / "siamese"
    rc, out, err = run_cli(capsys, "train", "siamese", "--data", image_root, "--size", "16", "--ways", "3",
                           "--shots", "1", "--queries", "2", "--batch", "2", "--episodes", "4", "--split",
                           "fraction:0.5", "--val-every", "0", "--hidden", "8", "--calibration-pairs", "200",
                           "--test-ways", "3", "--test-episodes", "5", "--test-queries", "2", "--no-progress",
                           "--out", run)
    assert rc == 0, err
    assert "test accuracy:" in out
    for which in ("best", "last"):                   # both checkpoints carry the calibrated threshold
        ck = torch.load(run / "checkpoints" / f"{which}.pt", weights_only=False)
        assert math.isfinite(float(ck["model"]["threshold"])) and ck["post_train"]["pairs"] == 200
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--queries", "2", "--episodes", "10",
                           "--pairs", "100", "--no-progress")
    assert rc == 0, err
    assert "3-way 1-shot" in out and "binary accuracy:" in out and "triplet accuracy:" in out
    assert "one-shot accuracy:" in out and "100 balanced pairs" in out
    saved = json.loads((run / "eval" / "pairs-100-seed0.json").read_text())
    assert saved["pairs"] == 100 and 0 <= saved["binary_acc"] <= 100 and saved["classes"] == 8
    sup = tmp_path / "support"
    classes = support_folder(image_root, sup)
    rc, out, err = run_cli(capsys, "predict", run, "--support", sup, "--query", sorted(classes[2].iterdir())[1],
                           "--no-progress")
    assert rc == 0, err
    assert out.split("\t")[1] in {c.name for c in classes}
    rc, out, err = run_cli(capsys, "plot", run, "--classes", "3", "--no-progress")
    assert rc == 0, err
    assert any(line.endswith(".png") and Path(line).is_file() for line in out.splitlines())
    # Reptile training through the same CLI, and a bad option as a one-line error
    rc, out, err = run_cli(capsys, "train", "siamese", "--data", image_root, "--size", "16", "--ways", "3",
                           "--shots", "1", "--queries", "2", "--episodes", "2", "--split", "fraction:0.5",
                           "--val-every", "0", "--hidden", "8", "--train", "reptile", "--inner-steps", "2",
                           "--optimizer", "sgd", "--lr", "0.5", "--calibration-pairs", "50", "--no-eval",
                           "--no-progress", "--out", tmp_path / "rep")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "train", "siamese", "--data", image_root, "--loss", "hinge", "--no-progress",
                         "--out", tmp_path / "bad")
    assert rc == 2 and "unknown loss 'hinge'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ learning
def _stroke_classes(n_classes: int = 40, per_class: int = 8, size: int = 16) -> ClassDataset:
    """Pen-stroke 'characters' (bright on dark) with per-image jitter: classes share structure, so what
    is learned on some classes transfers to others."""
    parts = [torch.stack([torch.from_numpy(255 - np.array(strokes(700 + c, size, jitter=i + 1, width=2)))
                          .unsqueeze(0) for i in range(per_class)]) for c in range(n_classes)]
    return ClassDataset.from_class_tensors(parts, [f"s{c:02d}" for c in range(n_classes)])


def test_short_training_beats_chance_on_held_out_classes(tmp_path: Path) -> None:
    ds = _stroke_classes()
    test = ds.split_fraction(test=0.3, seed=0)[1]                  # the 12 classes fit() holds out
    cfg = fs.RunConfig(method="siamese", data="strokes", size=16, split="fraction:0.3", val_fraction=0,
                       ways=5, shots=1, queries=3, options={"hidden": 16, "calibration_pairs": 400})
    cfg.train.episodes, cfg.train.val_every, cfg.train.lr = 60, 0, 1e-3
    torch.manual_seed(cfg.seed)                                      # the same initial weights as fit()
    untrained = methods.build("siamese", ds.image_shape, hidden=16).eval()
    before = fs.evaluate(untrained, EpisodeSampler(test, 5, 1, 5, seed=0), 100, progress=False)
    run = fs.fit(cfg, tmp_path / "run", progress=False, dataset=ds)
    res = fs.evaluate(run.method, EpisodeSampler(test, 5, 1, 5, seed=0), 100, progress=False)
    assert res.mean > 20 + 40, res                                  # 5-way 1-shot: chance is 20%
    assert res.mean > before.mean + 8, (before, res)                # and training, not the pixels, did it
    pm = run.method.pair_metrics(test, pairs=400)
    assert pm["binary_acc"] > 50 + 20, pm                           # balanced pairs: chance is 50%
    assert pm["triplet_acc"] > 50 + 30, pm
