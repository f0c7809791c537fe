"""Gaussian prototypical network (Fort 2017): inverse-covariance transforms, precision-weighted prototypes
and class-dependent distances against hand computations, shapes, options, learning on held-out classes,
and train -> eval -> predict -> plot through the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import learn_on_nuisance
from fewshot import methods
from fewshot.errors import FewshotError
from fewshot.methods.gaussian import TRANSFORMS, InverseCovariance, gaussian_distance, gaussian_prototypes

from test_cli import cli_roundtrip, run_cli


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


HAND_S = {  # raw -> inverse covariance, written out per transform (learned: offset = scale = div = 1)
    "softplus": lambda r: 1 + softplus(r),
    "sigmoid": lambda r: 1 + sigmoid(r),
    "sigmoid4": lambda r: 1 + 4 * sigmoid(r),
    "learned": lambda r: 1 + softplus(r),
}

# One task, 2-D embeddings, 2 classes x 2 shots + 2 queries. Each row: embedding then raw covariance.
SUPPORT = [([0., 0.], [0.5, -1.0]), ([2., 1.], [-0.3, 2.0]),       # class 0
           ([1., 3.], [1.5, 0.0]), ([-1., 2.], [-2.0, 0.7])]       # class 1
LABELS = [0, 0, 1, 1]
QUERIES = [[1., 1.], [0., 2.5]]


def hand_logits(transform: str, covariance: str, squared: bool = False) -> torch.Tensor:
    """Fort's equations with plain Python loops: s_i from the raw part, p_c = sum s x / sum s per
    dimension, S_c = sum s, d = sqrt(sum_j S_cj (q_j - p_cj)^2), logits -d (or -d^2)."""
    f = HAND_S[transform]
    s = []
    for _, raw in SUPPORT:
        if covariance == "radius":
            s.append([f(raw[0])] * 2)          # one number for both dimensions
        else:
            s.append([f(raw[0]), f(raw[1])])
    out = []
    for q in QUERIES:
        row = []
        for c in (0, 1):
            members = [i for i, y in enumerate(LABELS) if y == c]
            d2 = 0.0
            for j in range(2):
                S = sum(s[i][j] for i in members)
                p = sum(s[i][j] * SUPPORT[i][0][j] for i in members) / S
                d2 += S * (q[j] - p) ** 2
            row.append(-(d2 if squared else math.sqrt(d2)))
        out.append(row)
    return torch.tensor([out], dtype=torch.float32)


def _identity_gaussian(covariance: str, transform: str, **options):
    """A Gaussian protonet whose encoder is the identity on [embedding, raw covariance] vectors."""
    width = 2 + (1 if covariance == "radius" else 2)
    m = methods.build("gaussian", (width,), backbone="mlp", embedding=2, covariance=covariance,
                      transform=transform, **options)
    m.backbone = torch.nn.Identity()
    return m


def _inputs(covariance: str):
    rows = [emb + (raw[:1] if covariance == "radius" else raw) for emb, raw in SUPPORT]
    sx = torch.tensor([rows])
    pad = [0.0] * (1 if covariance == "radius" else 2)      # a query's own covariance is not used
    qx = torch.tensor([[q + pad for q in QUERIES]])
    return sx, torch.tensor([LABELS]), qx


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_by_hand(transform: str) -> None:
    raw = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    s = InverseCovariance(transform)(raw)
    hand = torch.tensor([HAND_S[transform](float(r)) for r in raw])
    assert torch.allclose(s, hand, atol=1e-6)
    assert (s >= 1).all()                                   # every fixed transform (and learned at init)


def test_learned_transform_uses_its_three_parameters() -> None:
    t = InverseCovariance("learned")
    with torch.no_grad():
        t.offset.fill_(0.5), t.scale.fill_(2.0), t.div.fill_(4.0)
    r = torch.tensor([-2.0, 1.0, 8.0])
    hand = torch.tensor([0.5 + 2.0 * softplus(v / 4.0) for v in r.tolist()])
    assert torch.allclose(t(r), hand, atol=1e-6)
    t(r).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs()) > 0 for p in (t.offset, t.scale, t.div))
    assert not list(InverseCovariance("softplus").parameters())


@pytest.mark.parametrize("covariance", ["radius", "diagonal"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_logits_by_hand(transform: str, covariance: str) -> None:
    m = _identity_gaussian(covariance, transform)
    sx, sy, qx = _inputs(covariance)
    got = m.predict(sx, sy, qx, 2)
    assert got.shape == (1, 2, 2)
    assert torch.allclose(got, hand_logits(transform, covariance), atol=1e-5), (got, hand_logits(transform, covariance))
    sq = _identity_gaussian(covariance, transform, squared=True).predict(sx, sy, qx, 2)
    assert torch.allclose(sq, hand_logits(transform, covariance, squared=True), atol=1e-4)


def test_prototype_weights_and_class_precision_by_hand() -> None:
    """Two examples of one class with precisions 1 and 3 on dimension 0: the prototype sits 3/4 of the way
    to the confident one and the class precision is their sum, 4."""
    z = torch.tensor([[[0., 10.], [4., 20.]]])
    s = torch.tensor([[[1., 2.], [3., 2.]]])
    p, S = gaussian_prototypes(z, s, torch.tensor([[0, 0]]), 1)
    assert torch.allclose(p, torch.tensor([[[3., 15.]]]))
    assert torch.allclose(S, torch.tensor([[[4., 4.]]]))
    d = gaussian_distance(torch.tensor([[[4., 15.]]]), p, S)          # sqrt(4 * 1^2 + 4 * 0^2) = 2
    assert torch.allclose(d, torch.tensor([[[2.]]]))
    # radius: one precision per example broadcast over the dimensions
    p, S = gaussian_prototypes(z, torch.tensor([[[1.], [3.]]]), torch.tensor([[0, 0]]), 1)
    assert torch.allclose(p, torch.tensor([[[3., 17.5]]])) and S.shape == (1, 1, 1)
    with pytest.raises(FewshotError, match="at least one support example"):
        gaussian_prototypes(z, s, torch.tensor([[0, 0]]), 2)


def test_distance_matches_direct_formula_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(2, 7, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    S = 1 + torch.rand(2, 3, 5, generator=g) * 3
    direct = ((q[:, :, None] - p[:, None]) ** 2 * S[:, None]).sum(-1).sqrt()
    assert torch.allclose(gaussian_distance(q, p, S), direct, atol=1e-5)


def test_shapes_with_conv4_and_larger_maps() -> None:
    g = torch.Generator().manual_seed(0)
    for cov in ("radius", "diagonal"):
        m = methods.build("gaussian", (1, 28, 28), covariance=cov, embedding=16, hidden=8).eval()
        assert m.backbone.features[1].__class__.__name__ == "Identity"      # no batch norm by default
        z, s = m.encode(torch.rand(5, 1, 28, 28, generator=g))
        assert z.shape == (5, 16) and s.shape == (5, 1 if cov == "radius" else 16) and (s >= 1).all()
        sx, qx = torch.rand(2, 6, 1, 28, 28, generator=g), torch.rand(2, 4, 1, 28, 28, generator=g)
        sy = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6)
        logits = m.predict(sx, sy, qx, 3)
        assert logits.shape == (2, 4, 3) and torch.isfinite(logits).all() and (logits <= 0).all()
        # a 32x32 input leaves a 2x2 map: the embedding is the flattened D-channel map
        m32 = methods.build("gaussian", (1, 32, 32), covariance=cov, embedding=4, hidden=8)
        z, s = m32.encode(torch.rand(3, 1, 32, 32, generator=g))
        assert z.shape == (3, 16) and s.shape == (3, 1 if cov == "radius" else 16)
    bn = methods.build("gaussian", (1, 16, 16), batch_norm=True)
    assert isinstance(bn.backbone.features[1], torch.nn.BatchNorm2d)
    assert methods.build("gaussian", (1, 16, 16)).backbone.features[-4].out_channels == 65   # 64 + radius


def test_logits_stay_fp32_under_bf16_autocast() -> None:
    m = _identity_gaussian("diagonal", "softplus")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 4, generator=g) * 3 + 5
    ys = torch.arange(4)[None]
    ref = m.predict(z, ys, z, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.predict(z, ys, z, 4)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-3)


def test_option_errors() -> None:
    for kw, msg in [({"covariance": "full"}, "unknown covariance 'full'"),
                    ({"transform": "exp"}, "unknown covariance transform 'exp'"),
                    ({"backbone": "resnet"}, "unknown backbone"), ({"embedding": 0}, "embedding must be")]:
        with pytest.raises(FewshotError, match=msg):
            methods.build("gaussian", (1, 28, 28), **kw)
    with pytest.raises(FewshotError, match="at least 16x16"):
        methods.build("gaussian", (1, 12, 12))
    assert methods.describe("gaussian").startswith("Gaussian prototypical network")


def test_learns_held_out_classes() -> None:
    """300 episodes (MLP encoder, diagonal covariance) lift 5-way 1-shot accuracy on unseen classes far above
    chance (20%) and the untrained network; the learned inverse covariances become non-uniform."""
    m, before, after = learn_on_nuisance("gaussian", backbone="mlp", mlp_hidden=[64], embedding=32,
                      covariance="diagonal", batch_norm=True)
    assert after.mean > 65 and after.mean > before.mean + 20, (before, after)


def test_cli_train_eval_predict_plot(capsys, tmp_path: Path, image_root: Path) -> None:
    cli_roundtrip(capsys, tmp_path / "g", image_root, "gaussian", "--hidden", "8", "--embedding", "8",
                  "--covariance", "diagonal", "--transform", "learned", shots=2)
    rc, _, err = run_cli(capsys, "train", "gaussian", "--data", image_root, "--size", "16", "--episodes", "1",
                         "--transform", "cube", "--no-progress", "--out", tmp_path / "bad")
    assert rc == 2 and "unknown covariance transform 'cube'" in err and "Traceback" not in err
