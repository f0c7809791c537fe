"""Matching networks: the attention maths against plain hand computations, full context embeddings (shape,
order behaviour, the attention LSTM against a per-query loop), a learning test on held-out classes, and
train -> eval -> predict -> plot through the CLI with and without FCE."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import learn_on_nuisance, support_folder
from fewshot import methods
from fewshot.episodes import Episode
from fewshot.errors import FewshotError
from fewshot.methods.matching import MatchingNet, attention_log_probs, cosine_matrix

from test_cli import run_cli


def _identity(**options) -> MatchingNet:
    """A matching network whose embedding is the 2-D input itself (no FCE), so its maths can be done by hand."""
    m = methods.build("matching", (2,), backbone="mlp", **options)
    m.backbone = torch.nn.Identity()
    return m


def _hand_log_probs(support, labels, query, ways, scale):
    """log P(n | q) = log Σ_{i: y_i = n} a_i with a = softmax(scale * cos), by plain Python."""
    def cos(u, v):
        nu, nv = math.hypot(*u), math.hypot(*v)
        return (u[0] * v[0] + u[1] * v[1]) / (max(nu, 1e-8) * max(nv, 1e-8))
    e = [math.exp(scale * cos(query, s)) for s in support]
    total = sum(e)
    return [math.log(sum(ei for ei, y in zip(e, labels) if y == n) / total) for n in range(ways)]


SUPPORT = [[1., 0.], [0., 1.], [1., 1.], [-1., 2.], [3., 0.5]]
LABELS = [0, 1, 1, 2, 0]
QUERIES = [[2., 0.], [0., 3.], [-1., 1.], [1., 2.]]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_attention_by_hand(scale: float) -> None:
    m = _identity(learn_scale=False, scale=scale)
    sx, sy, qx = torch.tensor([SUPPORT]), torch.tensor([LABELS]), torch.tensor([QUERIES])
    got = m.predict(sx, sy, qx, 3)
    assert got.shape == (1, 4, 3)
    hand = torch.tensor([_hand_log_probs(SUPPORT, LABELS, q, 3, scale) for q in QUERIES])
    assert torch.allclose(got[0], hand, atol=1e-6), (got, hand)
    # the first query: cos = 1, 0, 1/sqrt2, -1/sqrt5, 3/sqrt9.25 -> P(class 0) written out
    c = [1, 0, 1 / math.sqrt(2), -1 / math.sqrt(5), 3 / math.sqrt(9.25)]
    e = [math.exp(scale * v) for v in c]
    assert float(got[0, 0, 0].exp()) == pytest.approx((e[0] + e[4]) / sum(e), rel=1e-6)
    assert torch.allclose(got.exp().sum(-1), torch.ones(1, 4))


def test_log_probs_are_exact_when_the_attention_is_extreme() -> None:
    """With a huge scale the probabilities of the losing classes underflow in fp32, but the logits stay
    exact differences of logsumexps instead of log(0) = -inf."""
    att = torch.tensor([[[1000., 0., 707.]]])              # one query, three support items
    got = attention_log_probs(att, torch.tensor([[0, 1, 1]]), 2)
    assert torch.isfinite(got).all()
    assert float(got[0, 0, 1]) == pytest.approx(707 - 1000, abs=1e-3)
    assert float(got[0, 0, 0]) == pytest.approx(-math.exp(-293), abs=1e-6)
    with pytest.raises(FewshotError, match="at least one support example"):
        attention_log_probs(att, torch.tensor([[0, 0, 0]]), 2)


def test_cosine_matrix_by_hand() -> None:
    q = torch.tensor([[[3., 4.], [0., 0.]]])
    s = torch.tensor([[[1., 0.], [0., 2.], [-3., -4.]]])
    assert torch.allclose(cosine_matrix(q, s), torch.tensor([[[0.6, 0.8, -1.], [0., 0., 0.]]]))


def test_loss_is_nll_and_scale_is_learned() -> None:
    m = _identity()
    assert isinstance(m.log_scale, torch.nn.Parameter) and float(m.log_scale.detach().exp()) == pytest.approx(10.0)
    ep = Episode(torch.tensor([SUPPORT]), torch.tensor([LABELS]), torch.tensor([QUERIES]),
                 torch.tensor([[0, 1, 2, 1]]), ways=3, shots=1, queries=1)
    loss, metrics = m.loss(ep)
    hand = [_hand_log_probs(SUPPORT, LABELS, q, 3, 10.0) for q in QUERIES]
    expected = -sum(h[y] for h, y in zip(hand, [0, 1, 2, 1])) / 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    right = sum(max(range(3), key=lambda n: h[n]) == y for h, y in zip(hand, [0, 1, 2, 1]))
    assert metrics["acc"] == right / 4 and metrics["scale"] == pytest.approx(10.0)
    loss.backward()
    assert float(m.log_scale.grad.abs()) > 0
    fixed = _identity(learn_scale=False, scale=1.0)
    assert "log_scale" in dict(fixed.named_buffers()) and "log_scale" not in dict(fixed.named_parameters())


def test_order_of_the_support_does_not_matter_without_fce() -> None:
    torch.manual_seed(0)
    m = methods.build("matching", (1, 16, 16), hidden=8).eval()
    sx, qx = torch.rand(2, 6, 1, 16, 16), torch.rand(2, 5, 1, 16, 16)
    sy = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a = m.predict(sx, sy, qx, 3)
        b = m.predict(sx[:, perm], sy[:, perm], qx, 3)
    assert a.shape == (2, 5, 3)
    assert torch.allclose(a, b, atol=1e-5)


def test_fce_shapes_and_order_behaviour() -> None:
    torch.manual_seed(0)
    m = methods.build("matching", (1, 16, 16), hidden=8, fce=True, fce_steps=3).eval()
    assert m.support_lstm.hidden_size == 8 and m.support_lstm.bidirectional
    sx, qx = torch.rand(2, 6, 1, 16, 16), torch.rand(2, 5, 1, 16, 16)
    sy = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6)
    with torch.no_grad():
        logits = m.predict(sx, sy, qx, 3)
        assert logits.shape == (2, 5, 3) and torch.allclose(logits.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
        # queries do not see each other: permuting them permutes the outputs
        qp = torch.tensor([4, 2, 0, 1, 3])
        assert torch.allclose(m.predict(sx, sy, qx[:, qp], 3), logits[:, qp], atol=1e-5)
        # the bidirectional LSTM reads the support in order: shuffling it changes g(S)...
        zs, zq = m._embed_both(sx, qx)
        g, f = m.context(zs, zq)
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        g2, _ = m.context(zs[:, perm], zq)
        assert not torch.allclose(g2, g[:, perm], atol=1e-4)
        # ...with a skip connection: g = h_fwd + h_bwd + f'(x)
        out, _ = m.support_lstm(zs)
        assert torch.allclose(g, out[..., :8] + out[..., 8:] + zs)
        # ...while the query side only attends over g(S), a set: invariant to its order
        assert torch.allclose(m.query_lstm(zq, g[:, perm]), f, atol=1e-5)


def test_attention_lstm_matches_a_per_query_loop() -> None:
    """The batched attention LSTM equals the paper's recurrence written out query by query."""
    torch.manual_seed(1)
    m = methods.build("matching", (4,), backbone="mlp", mlp_hidden=[8], embedding=4, fce=True, fce_steps=2)
    lstm = m.query_lstm
    zq, g = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    got = lstm(zq, g)
    W_x, b, W_h = lstm.inp.weight, lstm.inp.bias, lstm.rec.weight
    for t in range(2):
        for j in range(3):
            x = zq[t, j]
            h, r, c = x.clone(), torch.zeros(4), torch.zeros(4)
            for _ in range(2):
                pre = W_x @ x + b + W_h @ torch.cat([h, r])
                i, f, o, u = pre[:4], pre[4:8], pre[8:12], pre[12:]
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
                h = torch.sigmoid(o) * torch.tanh(c) + x
                w = torch.softmax(torch.stack([h @ g[t, i_] for i_ in range(5)]), 0)
                r = sum(w[i_] * g[t, i_] for i_ in range(5))
            assert torch.allclose(got[t, j], h, atol=1e-5)


def test_logits_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    m = methods.build("matching", (1, 16, 16), hidden=8, fce=True).eval()
    sx, qx = torch.rand(1, 4, 1, 16, 16), torch.rand(1, 3, 1, 16, 16)
    sy = torch.arange(4)[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.predict(sx, sy, qx, 4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_option_errors() -> None:
    with pytest.raises(FewshotError, match="scale must be positive"):
        methods.build("matching", (4,), scale=0.0)
    with pytest.raises(FewshotError, match="fce_steps must be at least 1"):
        methods.build("matching", (4,), fce=True, fce_steps=0)
    with pytest.raises(FewshotError, match="unknown backbone"):
        methods.build("matching", (4,), backbone="vit")
    assert methods.describe("matching").startswith("Matching network")


@pytest.mark.parametrize("fce", [False, True])
def test_learns_held_out_classes(fce: bool) -> None:
    """300 episodes on 40 classes of the nuisance set (the class is a corner pattern among noise pixels) lift
    5-way 1-shot accuracy on 20 unseen classes far above chance (20%) and the untrained network, with and
    without full context embeddings."""
    m, before, after = learn_on_nuisance("matching", backbone="mlp", mlp_hidden=[64], embedding=32, fce=fce)
    assert after.mean > 70 and after.mean > before.mean + 25


# ------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("fce", ["false", "true"])
def test_train_eval_predict_plot_through_the_cli(capsys, tmp_path: Path, image_root: Path, fce: str) -> None:
    run = tmp_path / f"matching-fce-{fce}"
    rc, out, err = run_cli(capsys, "train", "matching", "--data", image_root, "--size", "16", "--ways", "3",
                           "--shots", "1", "--queries", "2", "--episodes", "20", "--split", "fraction:0.5",
                           "--val-every", "10", "--val-ways", "3", "--val-queries", "2", "--val-episodes", "5",
                           "--hidden", "8", "--fce", fce, "--fce-steps", "2", "--test-ways", "3",
                           "--test-queries", "2", "--test-episodes", "10", "--no-progress", "--out", run)
    assert rc == 0, err
    assert "test accuracy:" in out and "3-way 1-shot" in out
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--shots", "2", "--queries", "2", "--episodes",
                           "10", "--no-progress")
    assert rc == 0 and "3-way 2-shot" in out, err
    sup = tmp_path / "support"
    classes = support_folder(image_root, sup)
    query = sorted(classes[2].iterdir())[0]                # the support image of class 2 itself
    rc, out, err = run_cli(capsys, "predict", run, "--support", sup, "--query", query, "--no-progress")
    assert rc == 0, err
    fields = out.strip().split("\t")
    assert fields[1] in {c.name for c in classes} and 1 / 3 <= float(fields[2]) <= 1
    if fce == "false":      # cosine 1 with its own image: the largest attention weight
        assert fields[1] == classes[2].name
    rc, out, err = run_cli(capsys, "plot", run)
    assert rc == 0, err
    assert (run / "plots" / "tsne_test_classes.png").stat().st_size > 10_000
    assert (run / "plots" / "learning_curves.png").is_file()
