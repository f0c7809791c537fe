"""The LSTM optimiser of Andrychowicz et al. (2016): gradient preprocessing by hand, shapes for parameters
of several shapes, one update step against a hand-written LSTM, the optimisee problems and baselines by
hand, truncated BPTT lowering the meta-loss, and a short meta-training that optimises held-out quadratics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewshot.learned_optim as lo
from fewshot.errors import FewshotError


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------ preprocessing
def test_preprocessing_both_branches_by_hand() -> None:
    p = 10.0
    values = [0.5, -2.0, 3e-3, -7e-5, 4e-5, -1e-6, 0.0, math.exp(-p)]
    out = lo.preprocess_gradients(torch.tensor(values, dtype=torch.float64), p)
    assert out.shape == (len(values), 2)
    for v, (a, b) in zip(values, out.tolist()):
        if abs(v) >= math.exp(-p):          # log-magnitude and sign
            ea, eb = math.log(abs(v)) / p, (1.0 if v > 0 else -1.0)
        else:                                # tiny gradients: (-1, e^p g)
            ea, eb = -1.0, math.exp(p) * v
        assert a == pytest.approx(ea, abs=1e-12) and b == pytest.approx(eb, abs=1e-12), v
    # e.g. 0.5 -> (log 0.5 / 10, 1) = (-0.0693, 1); 1e-6 (below e^-10 = 4.54e-5) -> (-1, -0.0220)
    assert out[0].tolist() == pytest.approx([-0.0693147, 1.0], abs=1e-6)
    assert out[5].tolist() == pytest.approx([-1.0, -0.0220265], abs=1e-6)
    # no NaN gradient leaks from the unused branch at g = 0
    g = torch.tensor([0.0, 1e-7, 2.0], requires_grad=True)
    lo.preprocess_gradients(g).sum().backward()
    assert torch.isfinite(g.grad).all()
    with pytest.raises(FewshotError):
        lo.preprocess_gradients(g, p=0)


# ------------------------------------------------------------------------------------------ the optimiser
def test_output_shapes_for_parameters_of_several_shapes() -> None:
    torch.manual_seed(0)
    net = lo.LSTMOptimizer(hidden=20, layers=2)
    shapes = [(), (7,), (3, 4), (2, 3, 5)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    new, state = net.step(params, grads)
    n = sum(int(np.prod(s)) for s in shapes)
    assert [q.shape for q in new] == [torch.Size(s) for s in shapes]
    assert len(state) == 2 and all(h.shape == (n, 20) and c.shape == (n, 20) for h, c in state)
    new2, state2 = net.step(new, grads, state)          # the state is carried on
    assert [q.shape for q in new2] == [torch.Size(s) for s in shapes]
    raw = lo.LSTMOptimizer(hidden=5, layers=3, preprocess=False)
    upd, st = raw(torch.randn(11))
    assert upd.shape == (11,) and len(st) == 3 and st[2][0].shape == (11, 5)
    with pytest.raises(FewshotError, match="gradient of shape"):
        net.step([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(FewshotError, match="flat gradient"):
        net(torch.zeros(2, 2))


def _lstm_cell_numpy(cell: torch.nn.LSTMCell, x, h, c):
    """PyTorch's LSTM cell written out: gates (i, f, g, o) = W_ih x + b_ih + W_hh h + b_hh."""
    W_ih, W_hh = cell.weight_ih.detach().double().numpy(), cell.weight_hh.detach().double().numpy()
    b = cell.bias_ih.detach().double().numpy() + cell.bias_hh.detach().double().numpy()
    H = h.shape[-1]
    z = x @ W_ih.T + h @ W_hh.T + b
    i, f, g, o = _sig(z[:, :H]), _sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), _sig(z[:, 3 * H:])
    c = f * c + i * g
    return o * np.tanh(c), c


def test_one_update_step_matches_a_hand_written_lstm() -> None:
    """theta_1 = theta_0 + g_0 with g_0 = 0.1 * (w . h2 + b), h2 from two LSTM layers on preprocessed grads."""
    torch.manual_seed(1)
    net = lo.LSTMOptimizer(hidden=6, layers=2, output_scale=0.1).double()
    theta = [torch.randn(2, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [torch.tensor([[0.3, -1e-6, 2.0], [0.0, -0.04, 5e-5]], dtype=torch.float64),
             torch.tensor([1.5, -3.0, 1e-8, 0.7], dtype=torch.float64)]
    new, _ = net.step(theta, grads)
    g = np.concatenate([t.numpy().ravel() for t in grads])
    x = np.array([[math.log(abs(v)) / 10, np.sign(v)] if abs(v) >= math.exp(-10) else [-1.0, math.exp(10) * v]
                  for v in g])
    h = np.zeros((len(g), 6))
    for cell in net.cells:
        h, _ = _lstm_cell_numpy(cell, x, np.zeros((len(g), 6)), np.zeros((len(g), 6)))
        x = h
    upd = 0.1 * (h @ net.out.weight.detach().numpy().ravel() + float(net.out.bias.detach()))
    expected = np.concatenate([t.numpy().ravel() for t in theta]) + upd
    got = np.concatenate([t.detach().numpy().ravel() for t in new])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_learned_optimizer_wraps_a_module() -> None:
    torch.manual_seed(2)
    net = lo.LSTMOptimizer()
    lin = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in lin.parameters()]
    opt = lo.LearnedOptimizer(lin.parameters(), net)
    lin(torch.randn(5, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in lin.parameters()]
    opt.step()
    upd, _ = net(torch.cat([g.flatten() for g in grads]))
    after = torch.cat([p.detach().flatten() for p in lin.parameters()])
    torch.testing.assert_close(after, torch.cat([b.flatten() for b in before]) + upd.detach())
    assert opt._state is not None and opt._state[0][0].shape == (8, 20)


# ------------------------------------------------------------------------------------------ problems, baselines
def test_quadratic_problem_and_sgd_step_by_hand() -> None:
    q = lo.QuadraticProblems(3, generator=torch.Generator().manual_seed(0))
    W, y, th = q.W.double().numpy(), q.y.double().numpy(), q.theta0.double().numpy()
    f = [float(np.sum((W[k] @ th[k] - y[k]) ** 2)) for k in range(3)]
    np.testing.assert_allclose(q.loss(q.init_params()).numpy(), f, rtol=1e-5)
    lr = 1e-3
    curve = lo.run_baseline("sgd", lr, q, steps=1)
    th1 = [th[k] - lr * 2 * W[k].T @ (W[k] @ th[k] - y[k]) for k in range(3)]   # grad = 2 W^T (W theta - y)
    f1 = [float(np.sum((W[k] @ th1[k] - y[k]) ** 2)) for k in range(3)]
    assert curve.shape == (2, 3)
    np.testing.assert_allclose(curve[0].numpy(), f, rtol=1e-5)
    np.testing.assert_allclose(curve[1].numpy(), f1, rtol=1e-4)
    assert torch.equal(q.init_params()[0], q.theta0)   # every optimiser starts at the same theta_0


def test_mlp_problem_loss_by_hand() -> None:
    m = lo.MLPProblems(2, hidden=5, classes=3, n=12, generator=torch.Generator().manual_seed(0))
    assert m.x.shape == (2, 12, 2) and m.y.shape == (2, 12)
    assert m.y[0].bincount().tolist() == [4, 4, 4]
    w1, b1, w2, b2 = (t.double().numpy() for t in m.init_params())
    x, y = m.x.double().numpy(), m.y.numpy()
    for k in range(2):
        z = _sig(x[k] @ w1[k] + b1[k]) @ w2[k] + b2[k]
        ce = np.mean([np.log(np.exp(z[j]).sum()) - z[j, y[k, j]] for j in range(12)])
        assert float(m.loss(m.init_params())[k]) == pytest.approx(ce, rel=1e-5)


def test_tuning_picks_a_finite_learning_rate_and_marks_divergence() -> None:
    make = lo.problem_factory("quadratic", 16)
    best, scores = lo.tune_baseline("sgd", make, steps=30, lrs=[1e-4, 1e-3, 1e-2, 1.0])
    assert scores[1.0] == math.inf                       # SGD at lr 1 diverges on these quadratics
    assert best in (1e-3, 1e-2) and scores[best] == min(scores.values())
    assert scores[best] < scores[1e-4]
    with pytest.raises(FewshotError):
        lo.run_baseline("lbfgs", 0.1, make(torch.Generator()), 2)
    with pytest.raises(FewshotError):
        lo.problem_factory("rosenbrock", 3)


# ------------------------------------------------------------------------------------------ meta-training
def _meta_loss(net, problems, steps) -> float:
    return float(lo.run_learned(net, problems, steps)[1:].mean())


def test_truncated_bptt_changes_weights_and_lowers_the_meta_loss() -> None:
    torch.manual_seed(0)
    net = lo.LSTMOptimizer()
    fixed = lo.QuadraticProblems(8, generator=torch.Generator().manual_seed(5))
    before_w = [p.detach().clone() for p in net.parameters()]
    before = _meta_loss(net, fixed, 20)
    hist = lo.meta_train(net, lambda g: fixed, iterations=25, unroll=10, horizon=20, lr=3e-3)
    after = _meta_loss(net, fixed, 20)
    assert len(hist) == 25
    assert any(not torch.equal(a, b) for a, b in zip(before_w, net.parameters()))
    assert after < 0.7 * before, (before, after)
    assert hist[-1] < hist[0]


def test_short_meta_training_optimises_held_out_quadratics() -> None:
    """40 truncated-BPTT iterations on random quadratics: on 64 unseen problems the learned optimiser
    cuts the mean loss by more than 80% in 40 steps (an untrained LSTM does not lower it)."""
    torch.manual_seed(0)
    net = lo.LSTMOptimizer()
    test = lo.QuadraticProblems(64, generator=torch.Generator().manual_seed(123))
    start = float(test.loss(test.init_params()).mean())
    untrained = float(lo.run_learned(net, test, 40)[-1].mean())
    lo.meta_train(net, lo.problem_factory("quadratic", 32), iterations=40, unroll=20, horizon=40, lr=3e-3)
    curve = lo.run_learned(net, test, 40)
    assert torch.isfinite(curve).all()
    final = float(curve[-1].mean())
    assert final < 0.2 * start and final < 0.5 * untrained, (start, untrained, final)
    m, ci = lo.mean_ci(curve[-1])
    assert m == pytest.approx(final) and 0 < ci < m
