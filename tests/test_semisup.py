"""Semi-supervised prototypical network and semi-supervised episodes: unlabelled sets with distractor
classes, one soft k-means step by hand for each mode, reduction to protonet, CLI, learning for real."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fewshot as fs
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.methods import build
from fewshot.methods.semisup import refine_prototypes
from fewshot.run import split_dataset

from conftest import make_synthetic, support_folder
from test_cli import run_cli


def _numbered(n_classes=10, per_class=8) -> ClassDataset:
    """Every image holds its own global index (as two bytes), so images can be traced back."""
    parts = []
    for c in range(n_classes):
        idx = torch.arange(c * per_class, (c + 1) * per_class)
        img = torch.stack([idx // 256, idx % 256], 1).to(torch.uint8).view(per_class, 1, 1, 2)
        parts.append(img.expand(per_class, 1, 2, 2).contiguous())
    return ClassDataset.from_class_tensors(parts, [f"k{c}" for c in range(n_classes)])


def _ids(x: torch.Tensor, per_class=8) -> torch.Tensor:
    v = x[..., 0, 0, :].long()
    return v[..., 0] * 256 + v[..., 1]


def test_semi_supervised_episodes_hold_unlabelled_and_distractor_examples() -> None:
    ds = _numbered()
    s = EpisodeSampler(ds, 3, 2, 1, batch=4, dtype=None, seed=3, unlabeled=2, distractors=2)
    ep = s.sample()
    ux, uy = ep.extra["unlabeled_x"], ep.extra["unlabeled_y"]
    assert ux.shape == (4, (3 + 2) * 2, 1, 2, 2) and uy.shape == (4, 10)
    assert uy[0].tolist() == [0, 0, 1, 1, 2, 2, -1, -1, -1, -1]
    sid, qid, uid = _ids(ep.support_x), _ids(ep.query_x), _ids(ux)
    for b in range(4):
        ways = ep.classes[b].tolist()
        # unlabelled examples of the ways: the way's own class, never a support or query image
        for j in range(6):
            assert int(uid[b, j]) // 8 == ways[int(uy[b, j])]
        assert not set(uid[b].tolist()) & (set(sid[b].tolist()) | set(qid[b].tolist()))
        # distractors come from classes that are none of the task's ways
        distractor_classes = {int(i) // 8 for i in uid[b, 6:]}
        assert len(distractor_classes) == 2 and not distractor_classes & set(ways)
    assert "2-unlabelled +2 distractors" in repr(s)
    t = ep.task(1)
    assert torch.equal(t.extra["unlabeled_x"][0], ux[1])


def test_semi_supervised_episode_errors() -> None:
    ds = _numbered(n_classes=4, per_class=8)
    with pytest.raises(FewshotError, match="3 ways \\+ 2 distractor classes"):
        EpisodeSampler(ds, 3, 1, 1, distractors=2, unlabeled=1)
    with pytest.raises(FewshotError, match="set unlabeled > 0"):
        EpisodeSampler(ds, 2, 1, 1, distractors=1)
    with pytest.raises(FewshotError, match="2 shots \\+ 3 queries \\+ 4 unlabelled = 9"):
        EpisodeSampler(ds, 2, 2, 3, unlabeled=4)


# ------------------------------------------------------------------------------- one refinement step by hand
def _hand_step(protos, zs, ys, zu, logits_fn, weight_fn=None):
    """Numpy soft k-means step: assignments from ``logits_fn(distances)``; optional mask weights."""
    N = protos.shape[0]
    d = ((zu[:, None, :] - protos[None]) ** 2).sum(-1)                    # [U, N(+1)]
    logit = logits_fn(d)
    z = np.exp(logit - logit.max(1, keepdims=True))
    z /= z.sum(1, keepdims=True)
    if weight_fn is not None:
        z = z * weight_fn(d)
    out = np.zeros((N, zs.shape[1]))
    for c in range(N):
        num = zs[ys == c].sum(0) + (z[:, c:c + 1] * zu).sum(0)
        den = (ys == c).sum() + z[:, c].sum()
        out[c] = num / den
    return out


def _case():
    rng = np.random.default_rng(0)
    zs = rng.normal(size=(4, 3))
    ys = np.array([0, 0, 1, 1])
    zu = rng.normal(size=(5, 3)) * 1.5
    protos = np.stack([zs[:2].mean(0), zs[2:].mean(0)])
    t = lambda a: torch.tensor(a, dtype=torch.float64).unsqueeze(0)  # noqa: E731
    return zs, ys, zu, protos, t


def test_one_soft_kmeans_step_matches_hand_computation() -> None:
    zs, ys, zu, protos, t = _case()
    want = _hand_step(protos, zs, ys, zu, lambda d: -d)
    got = refine_prototypes(t(protos), t(zs), torch.tensor(ys).unsqueeze(0), t(zu), "kmeans")
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-10)


def test_distractor_cluster_step_matches_hand_computation() -> None:
    zs, ys, zu, protos, t = _case()
    r = 0.7
    with_origin = np.concatenate([protos, np.zeros((1, 3))])

    def logits(d):
        half = 0.5 * math.log(2 * math.pi)
        return np.concatenate([-d[:, :2] - half, -d[:, 2:] / r ** 2 - (half + math.log(r))], 1)
    want = _hand_step(with_origin, zs, ys, zu, logits)[:2]
    got = refine_prototypes(t(protos), t(zs), torch.tensor(ys).unsqueeze(0), t(zu), "distractor",
                            log_radius=torch.tensor(math.log(r), dtype=torch.float64))
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-10)


def test_masked_step_matches_hand_computation() -> None:
    zs, ys, zu, protos, t = _case()
    beta, gamma = 0.9, 3.0

    class Fixed(torch.nn.Module):
        def forward(self, stats):
            assert stats.shape[-1] == 5
            return torch.tensor([beta, gamma], dtype=stats.dtype).expand(*stats.shape[:-1], 2)

    def weights(d):
        dn = d / d.mean(0, keepdims=True)
        return 1 / (1 + np.exp(gamma * (dn - beta)))
    want = _hand_step(protos, zs, ys, zu, lambda d: -d, weights)
    got = refine_prototypes(t(protos), t(zs), torch.tensor(ys).unsqueeze(0), t(zu), "masked", mask_net=Fixed())
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-10)


def test_refinement_recovers_class_centres_from_unlabelled_points() -> None:
    """A badly placed single support point per class: soft k-means over many unlabelled points drawn
    around the true centres moves the prototypes towards them and classifies queries better."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    zs = centres + torch.tensor([[1.4, 1.4], [-1.0, 1.5], [1.5, -1.0]])     # 1-shot, off-centre
    ys = torch.arange(3)
    zu = (centres.repeat_interleave(30, 0) + torch.randn(90, 2, generator=g) * 0.6)
    zq = (centres.repeat_interleave(50, 0) + torch.randn(150, 2, generator=g) * 0.6)
    yq = torch.arange(3).repeat_interleave(50)
    p0 = zs.unsqueeze(0)
    p1 = refine_prototypes(p0, zs[None], ys[None], zu[None], "kmeans", steps=3)
    acc = lambda p: float(((zq[:, None] - p[0][None]).pow(2).sum(-1).argmin(1) == yq).float().mean())  # noqa
    assert (p1[0] - centres).norm(dim=1).max() < (p0[0] - centres).norm(dim=1).min() / 4
    assert acc(p0) < 0.97 and acc(p1) > 0.99


# ------------------------------------------------------------------------------- the method
@pytest.mark.parametrize("mode", ["kmeans", "distractor", "masked"])
def test_without_unlabelled_examples_it_is_a_prototypical_network(mode) -> None:
    torch.manual_seed(0)
    semi = build("semisup", (1, 16, 16), mode=mode).eval()
    proto = build("protonet", (1, 16, 16), distance="sqeuclidean").eval()    # Ren et al.'s distance
    proto.backbone.load_state_dict(semi.backbone.state_dict())
    sx, sy = torch.rand(2, 6, 1, 16, 16), torch.arange(3).repeat_interleave(2).expand(2, 6)
    qx = torch.rand(2, 4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(semi.predict(sx, sy, qx, 3), proto.predict(sx, sy, qx, 3))
        ux = torch.rand(2, 5, 1, 16, 16)
        out = semi.predict(sx, sy, qx, 3, unlabeled_x=ux)
    assert out.shape == (2, 4, 3) and not torch.allclose(out, proto.predict(sx, sy, qx, 3))


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(FewshotError, match="unknown semi-supervised mode 'soft'"):
        build("semisup", (1, 16, 16), mode="soft")


def test_distractor_and_mask_parameters_learn() -> None:
    ds = make_synthetic(n_classes=12, per_class=10, size=16)
    for mode, names in (("distractor", ["log_radius"]), ("masked", ["mask_net.2.weight"])):
        torch.manual_seed(0)
        m = build("semisup", (1, 16, 16), mode=mode, hidden=8)
        ep = EpisodeSampler(ds, 3, 1, 2, batch=2, unlabeled=2, distractors=1).sample()
        loss, metrics = m.loss(ep)
        loss.backward()
        params = dict(m.named_parameters())
        for n in names:
            assert params[n].grad is not None and float(params[n].grad.abs().sum()) > 0, (mode, n)
        assert 0 <= metrics["acc"] <= 1


def test_semisup_trains_evaluates_predicts_and_plots(capsys, tmp_path: Path, image_root: Path) -> None:
    out = tmp_path / "semi"
    rc, o, err = run_cli(capsys, "train", "semisup", "--data", image_root, "--size", "16", "--ways", "3",
                         "--shots", "1", "--queries", "1", "--unlabeled", "1", "--distractors", "1",
                         "--episodes", "4", "--split", "fraction:0.4", "--val-every", "0", "--hidden", "8",
                         "--mode", "distractor", "--test-ways", "2", "--test-queries", "1",
                         "--test-episodes", "10", "--no-progress", "--out", out)
    assert rc == 0, err
    assert "test accuracy:" in o and "2-way 1-shot" in o
    cfg = fs.RunConfig.load(out / "config.yaml")
    assert cfg.unlabeled == 1 and cfg.distractors == 1 and cfg.options["mode"] == "distractor"
    assert list((out / "eval").glob("2w1s1q1u1d-seed0.json"))
    rc, o, err = run_cli(capsys, "eval", out, "--ways", "2", "--queries", "1", "--unlabeled", "0",
                         "--distractors", "0", "--episodes", "10", "--no-progress")
    assert rc == 0 and "2-way 1-shot" in o, err
    sup = tmp_path / "support"
    classes = support_folder(image_root, sup)
    rc, o, err = run_cli(capsys, "predict", out, "--support", sup, "--query", sorted(classes[1].iterdir())[1],
                         "--no-progress")
    assert rc == 0 and o.split("\t")[1] in {c.name for c in classes}, err
    rc, o, err = run_cli(capsys, "plot", out, "--classes", "3", "--no-progress")
    assert rc == 0 and "tsne_test_classes.png" in o, err


def test_semisup_learns_held_out_classes() -> None:
    ds = make_synthetic(n_classes=30, per_class=12, size=16, noise=0.1)
    cfg = fs.RunConfig(method="semisup", options={"hidden": 16, "mode": "kmeans"}, ways=5, shots=1,
                       queries=3, unlabeled=3, distractors=1, split="fraction:0.3", val_fraction=0.0,
                       precision="fp32", channels_last=False)
    cfg.train.episodes, cfg.train.val_every = 100, 0
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        run = fs.fit(cfg, d, progress=False, dataset=ds)
    test = split_dataset(ds, cfg)[2]
    res = evaluate(run.method, EpisodeSampler(test, 5, 1, 3, unlabeled=3, distractors=1), 100, progress=False)
    assert res.mean > 45, res   # chance is 20 %
