"""Policy-gradient pieces: the REINFORCE estimate matches the exact gradient of the expected return."""
import math

import pytest
import torch

from fewshot.rl import BernoulliBandit
from fewshot.rl.pg import (advantages, linear_baseline, log_prob, pack_targets, pg_loss, returns_to_go,
                           sample_action)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_matches_exact_gradient_on_two_armed_bandit(baseline):
    torch.manual_seed(0)
    p = torch.tensor([[0.2, 0.7]])
    bandit, n, R = BernoulliBandit(2, 5), 5, 40000
    theta = torch.tensor([0.3, -0.4], requires_grad=True)
    g = torch.Generator().manual_seed(1)
    out = theta.detach().expand(1, R, 2)
    acts = torch.stack([sample_action(out, True, g) for _ in range(n)], 2)         # [1, R, n]
    state, _ = bandit.reset({"p": p}, R)
    rew = []
    for t in range(n):
        state, _, r, _ = bandit.step({"p": p}, state, acts[:, :, t], g)
        rew.append(r)
    rew = torch.stack(rew, 2)
    mask = torch.ones_like(rew)
    obs = torch.ones(1, R, n, 1)
    adv = advantages(obs, rew, mask, discount=1.0, baseline=baseline, normalize=False)
    targets = pack_targets(acts, adv, mask, True)[0].reshape(-1, 3)
    loss = pg_loss(theta.expand(R * n, 2), targets, True)
    est = -n * torch.autograd.grad(loss, theta)[0]                  # the loss averages over R * n steps
    pi = theta.detach().softmax(0)
    # J = n sum_a pi_a p_a; dJ/dtheta_j = n pi_j (p_j - sum_a pi_a p_a)
    exact = n * pi * (p[0] - (pi * p[0]).sum())
    # per-episode estimates' spread gives the tolerance (4 standard errors)
    per_ep = []
    lp_grad = torch.eye(2)[acts[0]] - pi                           # d log pi(a) / d theta, [R, n, 2]
    per_ep = (lp_grad * adv[0].unsqueeze(-1)).sum(1)               # [R, 2]
    se = per_ep.std(0) / math.sqrt(R)
    assert torch.all((est - exact).abs() < 4 * se + 1e-3), (est, exact, se)


def test_returns_to_go_and_mask():
    r = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    m = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    assert returns_to_go(r, m, 0.5).tolist() == [[[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]]


def test_linear_baseline_fits_time_dependent_returns():
    T = 50
    t = torch.arange(T, dtype=torch.float64) / 100
    returns = (3 - 2 * t + 5 * t ** 2).expand(2, 4, T).clone()
    obs = torch.zeros(2, 4, T, 2, dtype=torch.float64)
    fit = linear_baseline(obs, returns, torch.ones(2, 4, T, dtype=torch.float64))
    assert torch.allclose(fit, returns, atol=1e-3)   # exact up to the ridge term


def test_gaussian_log_prob():
    out = torch.tensor([[0.5, -1.0, math.log(2.0), 0.0]])          # means (0.5, -1), stds (2, 1)
    a = torch.tensor([[1.5, -1.0]])
    want = (-0.5 * 0.25 - math.log(2.0) - 0.5 * math.log(2 * math.pi)) + (-0.5 * math.log(2 * math.pi))
    assert log_prob(out, a, False).item() == pytest.approx(want, abs=1e-6)
