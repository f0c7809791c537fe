"""The meta-LSTM learner (Ravi & Larochelle 2017): the cell update and the gates by hand, one full
meta-learner step by hand, theta_0 and the meta-learner both learned, predict shapes, the command line
(train -> eval -> predict -> plot) and a short meta-training that beats chance on held-out classes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot import methods
from fewshot.errors import FewshotError
from fewshot.methods.metalstm import cell_update, gate

from conftest import adam_steps, make_synthetic
from test_cli import cli_roundtrip, run_cli


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _small(**kw):
    opts = dict(backbone="mlp", mlp_hidden=[8], outputs=3, bn="none", inner_steps=2)
    opts.update(kw)
    torch.manual_seed(0)
    return methods.build("metalstm", (1, 4, 4), **opts)


def _task(n_per=2, ways=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(2, ways * n_per, 1, 4, 4, generator=g)
    sy = torch.arange(ways).repeat_interleave(n_per).repeat(2, 1)
    qx = torch.rand(2, 5, 1, 4, 4, generator=g)
    return sx, sy, qx


# ------------------------------------------------------------------------------------------ by hand
def test_cell_update_by_hand() -> None:
    """c_t = f_t * c_{t-1} + i_t * (-grad_t), coordinate by coordinate."""
    c = [0.5, -1.0, 2.0, 0.0]
    g = [0.2, -0.4, 1.0, 3.0]
    f = [1.0, 0.9, 0.5, 0.99]
    i = [0.1, 0.01, 0.0, 0.5]
    out = cell_update(*(torch.tensor(v, dtype=torch.float64) for v in (c, g, f, i)))
    expected = [f[k] * c[k] + i[k] * (-g[k]) for k in range(4)]   # 0.48, -0.896, 1.0, -1.5
    assert out.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([0.48, -0.896, 1.0, -1.5])


def test_gates_by_hand() -> None:
    """i_t = sigma(W_I . [h_t, theta_{t-1}, i_{t-1}] + b_I) for each coordinate."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64)
    c = torch.randn(5, generator=g, dtype=torch.float64)
    prev = torch.rand(5, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    b = torch.tensor(-0.7, dtype=torch.float64)
    out = gate(w, b, h, c, prev)
    assert out.shape == (5,)
    for k in range(5):
        z = sum(float(w[j]) * float(h[k, j]) for j in range(3)) + float(w[3]) * float(c[k]) \
            + float(w[4]) * float(prev[k]) + float(b)
        assert float(out[k]) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-12)


def test_one_meta_learner_step_by_hand() -> None:
    """adapt for one step = f * theta_0 - i * grad with grad the support-loss gradient at theta_0, h from the
    first LSTM layer on (preprocessed grad, preprocessed loss), and the gates from h, theta_0 and zeros."""
    m = _small()
    sx, sy, _ = _task()
    theta0 = m.theta0().detach()
    leaf = theta0.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(m.learner(leaf, sx[0]), sy[0])
    (grad,) = torch.autograd.grad(loss, leaf)

    def pre(v):
        return [math.log(abs(v)) / 10, math.copysign(1.0, v)] if abs(v) >= math.exp(-10) else [-1.0, math.exp(10) * v]
    x = np.array([pre(float(gk)) + pre(float(loss.detach())) for gk in grad])
    cell = m.lstm
    W_ih, b = cell.weight_ih.detach().double().numpy(), (cell.bias_ih + cell.bias_hh).detach().double().numpy()
    H = m.config.lstm_hidden
    z = x @ W_ih.T + b                                     # zero initial h and c
    h = _sig(z[:, 3 * H:]) * np.tanh(_sig(z[:, :H]) * np.tanh(z[:, 2 * H:3 * H]))
    th, gr = theta0.double().numpy(), grad.double().numpy()
    wf, wi = m.w_f.detach().double().numpy(), m.w_i.detach().double().numpy()
    f = _sig(h @ wf[:H] + th * wf[H] + float(m.b_f.detach()))       # f_0 = i_0 = 0
    i = _sig(h @ wi[:H] + th * wi[H] + float(m.b_i.detach()))
    expected = f * th - i * gr
    got = m.adapt(sx[0], sy[0], 1).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the paper's initialisation: forget gate near 1, input gate (learning rate) near 0.01
    assert f.min() > 0.97 and i.max() < 0.03


def test_gate_and_state_shapes() -> None:
    m = _small()
    n = m.num_learner_params
    assert n == (16 * 8 + 8) + (8 * 3 + 3)
    sx, sy, _ = _task()
    c = m.theta0()
    grad, loss = m._support_grad(c, sx[0], sy[0])
    assert grad.shape == (n,) and loss.shape == ()
    c1, (h, s, f, i) = m.meta_step(c, grad, loss, m.initial_state(n, c.device))
    assert c1.shape == (n,) and h.shape == (n, 20) and s.shape == (n, 20) and f.shape == (n,) and i.shape == (n,)
    assert ((f > 0) & (f < 1) & (i > 0) & (i < 1)).all()


# ------------------------------------------------------------------------------------------ the contract
def test_theta0_and_meta_learner_are_learned() -> None:
    """The query loss after T steps sends gradients to theta_0 (the learner's weights) and to every
    meta-learner weight; an optimiser step moves theta_0."""
    m = _small()
    from fewshot.episodes import Episode
    sx, sy, qx = _task()
    ep = Episode(sx, sy, qx, sy[:, :5].clone(), ways=3, shots=2, queries=1)
    loss, metrics = m.loss(ep)
    assert loss.dim() == 0 and set(metrics) == {"ce", "acc"}
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    before = m.theta0().detach().clone()
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert not torch.equal(before, m.theta0().detach())


def test_predict_shapes_and_head_size() -> None:
    m = _small(outputs=4)
    sx, sy, qx = _task()
    out = m.predict(sx, sy, qx, ways=3)
    assert out.shape == (2, 5, 3) and out.dtype == torch.float32
    assert m.predict(sx, sy, qx).shape == (2, 5, 3)           # ways inferred from the labels
    zero = m.predict(sx, sy, qx, ways=3, steps=0)             # no adaptation: theta_0 itself
    with torch.no_grad():
        direct = m.learner(m.theta0(), qx[0])[:, :3]
    torch.testing.assert_close(zero[0], direct)
    assert not torch.allclose(zero, out)                      # adaptation changes the predictions
    with pytest.raises(FewshotError, match="4-way head"):
        m.predict(sx, sy, qx, ways=5)
    with pytest.raises(FewshotError):
        _small(bn="running")
    with pytest.raises(FewshotError):
        _small(outputs=0)


# ------------------------------------------------------------------------------------------ command line
def test_cli_train_eval_predict_plot(capsys, tmp_path: Path, image_root: Path) -> None:
    run = tmp_path / "metalstm"
    cli_roundtrip(capsys, run, image_root, "metalstm", "--batch", "2", "--hidden", "8", "--inner-steps", "2",
                  query=(1, 1))
    import fewshot as fs
    cfg = fs.RunConfig.load(run / "config.yaml")
    assert cfg.options["outputs"] == 3 and cfg.train.grad_clip == 0.25     # head from --ways; run defaults
    rc, _, err = run_cli(capsys, "eval", run, "--ways", "5", "--queries", "2", "--episodes", "5", "--no-progress")
    assert rc == 2 and "3-way head" in err and "Traceback" not in err
    assert (run / "plots" / "metalstm_gates.png").stat().st_size > 5_000


# ------------------------------------------------------------------------------------------ learning
def test_short_meta_training_beats_chance_on_held_out_classes() -> None:
    """80 meta-steps of four 5-way 1-shot tasks with a small MLP learner (T = 3): on classes never seen, the
    adapted learner classifies 5-way 1-shot queries well above chance (20%); theta_0 alone cannot (labels
    are permuted per task), so the gain is the learned update rule's."""
    from fewshot.episodes import EpisodeSampler
    from fewshot.evaluate import evaluate
    ds = make_synthetic(n_classes=60, per_class=10, size=8, noise=0.1)
    train_ds, test_ds = ds.split_fraction(test=1 / 3, seed=0)
    torch.manual_seed(0)
    m = methods.build("metalstm", ds.image_shape, backbone="mlp", mlp_hidden=[16], lstm_hidden=10, outputs=5,
                      bn="none", inner_steps=3)
    sampler = EpisodeSampler(train_ds, 5, 1, 5, batch=4, seed=0)
    test = EpisodeSampler(test_ds, 5, 1, 5, seed=1)
    adam_steps(m, sampler, 80, lr=3e-3, clip=0.25)
    res = evaluate(m, test, 100, progress=False)
    zero = float(np.mean([float((m.predict(e.support_x, e.support_y, e.query_x, 5, steps=0).argmax(-1)
                                 == e.query_y).float().mean()) for e in [test.sample() for _ in range(20)]]))
    print(f"metalstm held-out 5-way 1-shot: {res}; theta_0 alone {100 * zero:.1f}%")
    assert res.mean > 45, str(res)
    assert zero < 0.35
