"""Policy-gradient pieces shared by the meta-RL methods: policies read from network outputs, the linear
feature baseline, advantages, the REINFORCE surrogate loss, and the KL divergence between two policies and
its Hessian (the Fisher information) for the trust-region outer step of :mod:`fewshot.rl.trpo`.

A policy network's output ``out`` ``[M, D]`` is read as

- a categorical distribution over ``D`` discrete actions (logits), or
- a diagonal Gaussian over ``A = D / 2`` continuous action dimensions: the mean, then the log standard
  deviation (clamped to [-5, 2]); a network with a state-independent spread simply learns a constant there.

The REINFORCE estimator (Williams 1992) of the gradient of the expected return is
``E[sum_t grad log pi(a_t | s_t) * A_t]`` with advantages ``A_t = G_t - b(s_t, t)``: ``G_t`` the discounted
return-to-go and ``b`` a linear function of features of the state and time fitted to the returns by ridge
regression (the "linear feature baseline" of Duan et al. 2016: ``[s, s^2, t, t^2, t^3, 1]`` with ``t`` the
step divided by 100). :func:`pack_targets` lays out what the loss needs (actions, advantages, step
weights) as one float tensor per sample, so an inner loop written for ``(inputs, targets)`` pairs runs a
policy-gradient step unchanged.
"""
from __future__ import annotations

import math

import torch

LOG_STD_RANGE = (-5.0, 2.0)


def _gaussian(out: torch.Tensor) -> tuple:
    A = out.shape[-1] // 2
    return out[..., :A], out[..., A:2 * A].clamp(*LOG_STD_RANGE)


def log_prob(out: torch.Tensor, actions: torch.Tensor, discrete: bool) -> torch.Tensor:
    """``log pi(a | s)`` per sample: ``out`` ``[..., D]``, actions ``[...]`` (discrete) or ``[..., A]``."""
    out = out.float()
    if discrete:
        return out.log_softmax(-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    mean, log_std = _gaussian(out)
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def policy_kl(old: torch.Tensor, new: torch.Tensor, discrete: bool) -> torch.Tensor:
    """``KL(pi_old(.|s) || pi_new(.|s))`` per sample from two network outputs ``[..., D]``."""
    old, new = old.float(), new.float()
    if discrete:
        lo, ln = old.log_softmax(-1), new.log_softmax(-1)
        return (lo.exp() * (lo - ln)).sum(-1)
    mo, so = _gaussian(old)
    mn, sn = _gaussian(new)
    return (sn - so + ((2 * so).exp() + (mo - mn) ** 2) / (2 * (2 * sn).exp()) - 0.5).sum(-1)


def fisher_product(out: torch.Tensor, tangent: torch.Tensor, discrete: bool) -> torch.Tensor:
    """The policy's Fisher information in output space at ``out`` (the Hessian of :func:`policy_kl` in its
    second argument at the first) times an output tangent ``[..., D]``: ``diag(p) - pp'`` for logits; for a
    Gaussian ``1/sigma^2`` on the mean and 2 on the log standard deviation (0 where it is clamped)."""
    out, tangent = out.float(), tangent.float()
    if discrete:
        p = out.softmax(-1)
        return p * tangent - p * (p * tangent).sum(-1, keepdim=True)
    A = out.shape[-1] // 2
    raw = out[..., A:2 * A]
    inside = ((raw >= LOG_STD_RANGE[0]) & (raw <= LOG_STD_RANGE[1])).float()
    fm = tangent[..., :A] * (-2 * raw.clamp(*LOG_STD_RANGE)).exp()
    fs = 2 * inside * tangent[..., A:2 * A]
    return torch.cat([fm, fs, torch.zeros_like(tangent[..., 2 * A:])], -1)


def sample_action(out: torch.Tensor, discrete: bool, generator: torch.Generator) -> torch.Tensor:
    """One action per row of ``out`` from the policy it describes."""
    out = out.float()
    if discrete:
        flat = out.reshape(-1, out.shape[-1]).softmax(-1)
        return torch.multinomial(flat, 1, generator=generator).view(out.shape[:-1])
    mean, log_std = _gaussian(out)
    return mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=out.device)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """``G_t = sum_{u >= t} discount^(u - t) r_u`` over the last axis (masked steps count 0)."""
    r = rewards * mask
    out = torch.zeros_like(r)
    acc = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., t] + discount * acc
        out[..., t] = acc
    return out


def baseline_features(obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[s, s^2, t, t^2, t^3, 1]`` per step of ``obs`` ``[..., T, O]`` (t = step / 100), zero where masked."""
    T = obs.shape[-2]
    t = (torch.arange(T, device=obs.device, dtype=obs.dtype) / 100.0).view(*([1] * (obs.dim() - 2)), T, 1)
    t = t.expand(*obs.shape[:-1], 1)
    o = obs.clamp(-10, 10)
    feats = torch.cat([o, o * o, t, t * t, t ** 3, torch.ones_like(t)], -1)
    return feats * mask.unsqueeze(-1)


def linear_baseline(obs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """Per-task fit of a linear function of :func:`baseline_features` to the returns, evaluated at every
    step: ``obs`` ``[B, R, T, O]``, ``returns``/``mask`` ``[B, R, T]`` -> ``[B, R, T]`` (no gradient)."""
    with torch.no_grad():
        B = obs.shape[0]
        X = baseline_features(obs.double(), mask.double()).reshape(B, -1, obs.shape[-1] * 2 + 4)
        y = (returns.double() * mask.double()).reshape(B, -1, 1)
        XtX = X.transpose(1, 2) @ X
        eye = torch.eye(XtX.shape[-1], dtype=XtX.dtype, device=XtX.device)
        reg = ridge
        for _ in range(6):      # raise the ridge until the system is well posed (as rllab does)
            try:
                w = torch.linalg.solve(XtX + reg * eye, X.transpose(1, 2) @ y)
                if torch.isfinite(w).all():
                    break
            except RuntimeError:
                pass
            reg *= 10
        return (X @ w).reshape(returns.shape).to(returns.dtype) * mask


def advantages(obs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, discount: float = 0.99,
               baseline: bool = True, normalize: bool = True) -> torch.Tensor:
    """``G_t - b(s_t, t)`` per step ``[B, R, T]``, optionally normalised per task to mean 0 and standard
    deviation 1 over its unmasked steps."""
    G = returns_to_go(rewards, mask, discount)
    adv = G - linear_baseline(obs, G, mask) if baseline else G
    if normalize:
        n = mask.sum((1, 2), keepdim=True).clamp(min=1)
        mean = (adv * mask).sum((1, 2), keepdim=True) / n
        var = (((adv - mean) * mask) ** 2).sum((1, 2), keepdim=True) / n
        adv = (adv - mean) / (var.sqrt() + 1e-8)
    return (adv * mask).detach()


def pack_targets(actions: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, discrete: bool) -> torch.Tensor:
    """``[..., A + 2]`` float targets for :func:`pg_loss`: the action(s), the advantage, the step weight."""
    a = actions.unsqueeze(-1).to(adv.dtype) if discrete else actions.to(adv.dtype)
    return torch.cat([a, adv.unsqueeze(-1), mask.to(adv.dtype).unsqueeze(-1)], -1)


def pg_loss(out: torch.Tensor, targets: torch.Tensor, discrete: bool) -> torch.Tensor:
    """The REINFORCE surrogate ``-sum w A log pi(a | s) / sum w`` of one task's samples: ``out``
    ``[M, D]`` from the policy network, ``targets`` ``[M, A + 2]`` from :func:`pack_targets`. Its gradient
    is the policy-gradient estimate; its value is not a return."""
    actions, adv, w = targets[..., :-2], targets[..., -2], targets[..., -1]
    lp = log_prob(out, actions.squeeze(-1) if discrete else actions, discrete)
    return -(w * adv * lp).sum() / w.sum().clamp(min=1)
