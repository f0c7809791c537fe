"""Prototypical networks: prototype and distance maths against hand computations, the loss, gradients,
options, and a small learning test on held-out classes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import learn_on_nuisance
from fewshot import methods
from fewshot.episodes import Episode
from fewshot.errors import FewshotError
from fewshot.methods.protonet import DISTANCES, ProtoNet, distance, make_backbone, prototypes

R2 = 1 / math.sqrt(2)

# Two tasks of 2-D embeddings. Task 0: labels in blocks; task 1: labels interleaved.
ZS = torch.tensor([[[0., 0.], [2., 0.], [0., 2.], [0., 4.]],
                   [[1., 1.], [-1., 0.], [3., 3.], [-1., 2.]]])
YS = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
PROTOS = torch.tensor([[[1., 0.], [0., 3.]],          # means worked out by hand
                       [[-1., 1.], [2., 2.]]])
ZQ = torch.tensor([[[1., 1.], [3., 0.]],
                   [[0., 0.], [2., 1.]]])
HAND = {
    "sqeuclidean": [[[1, 5], [4, 18]], [[2, 8], [9, 1]]],
    "euclidean": [[[1, math.sqrt(5)], [2, math.sqrt(18)]], [[math.sqrt(2), math.sqrt(8)], [3, 1]]],
    # 1 - cos: [1,1] is at 45 degrees from both [1,0] and [0,3]; [3,0] is parallel to [1,0], orthogonal to [0,3]
    "cosine": [[[1 - R2, 1 - R2], [0, 1]],
               # [0,0] has no direction (its norm is clamped): cos = 0; [2,1] vs [-1,1]: -1/sqrt(10); vs [2,2]: 3/sqrt(10)
               [[1, 1], [1 + 1 / math.sqrt(10), 1 - 3 / math.sqrt(10)]]],
    "dot": [[[-1, -3], [-3, 0]], [[0, 0], [1, -6]]],
}


def test_prototypes_by_hand() -> None:
    assert torch.allclose(prototypes(ZS, YS, 2), PROTOS)
    # unequal shots per class
    z = torch.tensor([[[1., 0.], [3., 0.], [5., 3.], [0., 9.]]])
    y = torch.tensor([[0, 0, 0, 1]])
    assert torch.allclose(prototypes(z, y, 2), torch.tensor([[[3., 1.], [0., 9.]]]))


def test_prototypes_need_every_class() -> None:
    with pytest.raises(FewshotError, match="at least one support example"):
        prototypes(ZS, YS, 3)


@pytest.mark.parametrize("kind", DISTANCES)
def test_distance_by_hand(kind: str) -> None:
    d = distance(ZQ, PROTOS, kind)
    assert d.shape == (2, 2, 2)
    assert torch.allclose(d, torch.tensor(HAND[kind], dtype=torch.float32), atol=1e-6), (kind, d)


def test_distance_unknown_kind() -> None:
    with pytest.raises(FewshotError, match="unknown distance 'manhattan'"):
        distance(ZQ, PROTOS, "manhattan")


def test_sqeuclidean_matches_cdist_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(3, 7, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    assert torch.allclose(distance(q, c, "sqeuclidean"), torch.cdist(q, c) ** 2, atol=1e-5)
    assert torch.allclose(distance(q, c, "euclidean"), torch.cdist(q, c), atol=1e-5)
    assert (distance(q, q[:, :4], "sqeuclidean").diagonal(dim1=1, dim2=2).abs() < 1e-5).all()


# ------------------------------------------------------------------------------------------ the method
def _identity_protonet(**options) -> ProtoNet:
    """A protonet whose embedding is the input itself (2-D vectors), so its maths can be checked by hand."""
    m = methods.build("protonet", (2,), backbone="mlp", **options)
    m.backbone = torch.nn.Identity()
    return m


def _episode(dtype=torch.float32) -> Episode:
    return Episode(support_x=ZS[:1].to(dtype), support_y=YS[:1], query_x=ZQ[:1].to(dtype),
                   query_y=torch.tensor([[0, 1]]), ways=2, shots=2, queries=1)


def test_default_distance_is_euclidean() -> None:
    assert ProtoNet.Config().distance == "euclidean"        # BENCHMARKS.md "Within-alphabet": why


def test_loss_is_cross_entropy_of_negative_distance() -> None:
    m = _identity_protonet(distance="sqeuclidean")
    loss, metrics = m.loss(_episode())
    # logits -[1, 5] (label 0) and -[4, 18] (label 1)
    hand = (math.log(1 + math.exp(-4)) + (14 + math.log(1 + math.exp(-14)))) / 2
    assert float(loss) == pytest.approx(hand, rel=1e-6)
    assert metrics["ce"] == pytest.approx(hand, rel=1e-6)
    assert metrics["acc"] == 0.5                           # the second query is nearer prototype 0
    logits = m.predict(ZS, YS, ZQ, 2)
    assert torch.allclose(logits, -torch.tensor(HAND["sqeuclidean"], dtype=torch.float32))
    assert torch.allclose(m.predict(ZS, YS, ZQ), logits)   # ways inferred from the labels


@pytest.mark.parametrize("kind", DISTANCES)
def test_logits_for_every_distance_and_scale(kind: str) -> None:
    m = _identity_protonet(distance=kind, scale=2.5)
    assert torch.allclose(m.predict(ZS, YS, ZQ, 2), -2.5 * torch.tensor(HAND[kind], dtype=torch.float32), atol=1e-5)


def test_logits_stay_fp32_under_bf16_autocast() -> None:
    """Distances are computed in fp32 even inside bf16 autocast: a query equal to a prototype stays at
    distance ~0 although the embeddings have a large common component (squared distances: the square
    root of the Euclidean one magnifies the fp32 rounding of the expansion near 0)."""
    m = _identity_protonet(distance="sqeuclidean")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 64, generator=g) * 3 + 5
    ys = torch.arange(4)[None]
    ref = m.predict(z, ys, z, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.predict(z, ys, z, 4)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-2)
    assert got.diagonal(dim1=1, dim2=2).abs().max() < 1e-2


def test_predict_shapes_with_conv4() -> None:
    m = methods.build("protonet", (1, 16, 16))
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(2, 6, 1, 16, 16, generator=g), torch.rand(2, 4, 1, 16, 16, generator=g)
    sy = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6)
    m.eval()
    logits = m.predict(sx, sy, qx, 3)
    assert logits.shape == (2, 4, 3) and torch.isfinite(logits).all()
    assert m.embed(torch.rand(5, 1, 28, 28)).shape == (5, 64)
    assert (logits <= 0).all()                             # minus a squared distance


def test_l2_penalty_adds_half_squared_norm() -> None:
    torch.manual_seed(0)
    lam = 0.05
    plain = methods.build("protonet", (2,), backbone="mlp", mlp_hidden=[8], embedding=4, learn_scale=True)
    pen = methods.build("protonet", (2,), backbone="mlp", mlp_hidden=[8], embedding=4, learn_scale=True,
                        l2_penalty=lam)
    pen.load_state_dict(plain.state_dict())
    ep = _episode()
    base, _ = plain.loss(ep)
    total, metrics = pen.loss(ep)
    norm = sum(0.5 * p.pow(2).sum() for n, p in plain.named_parameters() if n != "log_scale")
    assert float((total - base).detach()) == pytest.approx(lam * float(norm.detach()), rel=1e-5)
    assert metrics["ce"] == pytest.approx(float(base.detach()), rel=1e-6)     # metrics report the bare loss


def test_learn_scale_gets_a_gradient() -> None:
    m = _identity_protonet(learn_scale=True, scale=0.5)
    assert isinstance(m.log_scale, torch.nn.Parameter)
    assert float(m.log_scale.detach().exp()) == pytest.approx(0.5)
    loss, _ = m.loss(_episode())
    loss.backward()
    assert m.log_scale.grad is not None and float(m.log_scale.grad.abs()) > 0
    fixed = _identity_protonet()
    assert "log_scale" not in dict(fixed.named_parameters()) and "log_scale" in dict(fixed.named_buffers())


@pytest.mark.parametrize("kind", DISTANCES)
def test_gradient_matches_finite_differences(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.tensor([0, 1, 2, 0, 1, 2]).expand(2, 6)
    yq = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 1, 0, 0]])

    def loss(zs, zq):
        d = distance(zq, prototypes(zs, ys, 3), kind)
        return F.cross_entropy(-d.flatten(0, 1), yq.flatten())

    assert torch.autograd.gradcheck(loss, (zs, zq), eps=1e-6, atol=1e-6)


def test_method_gradient_matches_the_hand_loss() -> None:
    """The method's gradient w.r.t. a query embedding equals a central finite difference of the hand loss."""
    m = _identity_protonet(distance="sqeuclidean")
    ep = _episode(torch.float64)
    qx = ep.query_x.clone().requires_grad_(True)
    loss, _ = m.loss(Episode(ep.support_x, ep.support_y, qx, ep.query_y, 2, 2, 1))
    (grad,) = torch.autograd.grad(loss, qx)

    def hand(q):
        d = ((q[0][:, None, :] - PROTOS[0].double()[None]) ** 2).sum(-1)
        return F.cross_entropy(-d, ep.query_y[0]).item()

    eps = 1e-6
    fd = torch.zeros_like(qx)
    for i in range(2):
        for j in range(2):
            hi, lo = ep.query_x.clone(), ep.query_x.clone()
            hi[0, i, j] += eps
            lo[0, i, j] -= eps
            fd[0, i, j] = (hand(hi) - hand(lo)) / (2 * eps)
    assert torch.allclose(grad, fd, atol=1e-5), (grad, fd)


# ------------------------------------------------------------------------------------------ options
def test_option_errors() -> None:
    with pytest.raises(FewshotError, match="unknown distance"):
        methods.build("protonet", (1, 28, 28), distance="l1")
    with pytest.raises(FewshotError, match="unknown backbone"):
        make_backbone("resnet99", (1, 28, 28), 64, [8], 8)
    with pytest.raises(FewshotError, match="conv4 needs image inputs"):
        methods.build("protonet", (10,), backbone="conv4")
    with pytest.raises(FewshotError, match="at least 16x16"):
        methods.build("protonet", (1, 12, 12), backbone="conv4")
    with pytest.raises(FewshotError, match="has no option 'depth'"):
        methods.build("protonet", (1, 28, 28), depth=3)
    with pytest.raises(FewshotError, match="unknown method 'maml2'"):
        methods.build("maml2", (1, 28, 28))


def test_registry() -> None:
    assert "protonet" in methods.available()
    assert methods.get("protonet") is ProtoNet
    assert methods.describe("protonet").startswith("Prototypical network")
    m = methods.build("protonet", (1, 28, 28), hidden=16)
    assert m.config_dict()["hidden"] == 16 and m.in_shape == (1, 28, 28)
    assert isinstance(methods.build("protonet", (1, 28, 28)).backbone, torch.nn.Module)
    assert type(methods.build("protonet", (5,)).backbone).__name__ == "MLP"
    assert type(methods.build("protonet", (1, 16, 16)).backbone).__name__ == "Conv4"


# ------------------------------------------------------------------------------------------ learning
def test_learns_held_out_classes() -> None:
    """300 episodes on 40 training classes lift 5-way 1-shot accuracy on 20 unseen classes far above
    chance (20%) and far above the untrained network (whose distances are dominated by noise pixels)."""
    m, before, after = learn_on_nuisance("protonet", backbone="mlp", mlp_hidden=[64], embedding=32)
    assert after.mean > 70 and after.mean > before.mean + 25
    assert after.ci95 < 5


def test_separate_passes_give_support_and_queries_their_own_batch_statistics():
    """separate_passes (easyfsl's procedure): in training each set is normalised by its own batch-norm
    statistics, i.e. embedded exactly as alone; in evaluation (running statistics) nothing changes."""
    torch.manual_seed(0)
    joint = methods.build("protonet", (1, 16, 16), hidden=8)
    sep = methods.build("protonet", (1, 16, 16), hidden=8, separate_passes=True)
    sep.load_state_dict(joint.state_dict())
    sx, qx = torch.randn(2, 5, 1, 16, 16), torch.randn(2, 7, 1, 16, 16) + 1.0
    joint.train(), sep.train()
    zs, zq = sep.embed_tasks(sx, qx)
    alone = joint.feature_vectors(sx.flatten(0, 1)).view(2, 5, -1)
    assert torch.allclose(zs, alone, atol=1e-5)
    js, _ = joint.embed_tasks(sx, qx)
    assert not torch.allclose(js, zs, atol=1e-3)
    sep.load_state_dict(joint.state_dict())         # the same running statistics
    joint.eval(), sep.eval()
    a, b = joint.embed_tasks(sx, qx), sep.embed_tasks(sx, qx)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))
