"""Classical policies for Bernoulli bandits, the yardsticks for meta-learned bandit policies.

Every policy sees, for each of ``B x R`` episodes, the successes ``s`` and failures ``f`` of each arm so far
(``[B, R, k]``), the pull number ``t`` (0-based) and the pulls left, and returns the arm to pull ``[B, R]``.
The prior over each arm's success probability is the family's own, ``U(0, 1) = Beta(1, 1)``.

- ``random``: a uniformly random arm.
- ``greedy``: the arm with the highest posterior mean ``(s + 1) / (s + f + 2)``, ties broken at random.
- ``ucb1`` (Auer, Cesa-Bianchi & Fischer 2002): each arm once, then ``argmax s/n_i + sqrt(2 ln t / n_i)``.
- ``thompson`` (Thompson 1933): one draw from each arm's posterior ``Beta(s + 1, f + 1)``, the arm of the
  largest draw.
- ``gittins``: the finite-horizon Gittins index policy: with ``m`` pulls left, pull the arm whose
  *finite-horizon Gittins index* is largest. The index of an arm in state ``(s, f)`` with ``m`` pulls left
  is the per-pull reward ``lambda`` of a known arm at which one is indifferent between retiring to the
  known arm for the remaining ``m`` pulls and pulling this arm once more and then choosing optimally
  between the two (:func:`gittins_table`). It is the classical near-Bayes-optimal policy for a finite
  horizon; with a discount factor in place of the horizon it is exactly Bayes-optimal (Gittins 1979).
- ``bayes`` (two arms): the exact Bayes-optimal policy, by dynamic programming over every posterior state
  of both arms (:func:`bayes_optimal_2arm`).

:func:`run_policy` plays a policy on the tasks of a :class:`~fewshot.rl.envs.BernoulliBandit`; run every
policy on the same tasks with the same environment seed and they see the same reward draws for the same
pulls (common random numbers), which sharpens comparisons.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Dict

import numpy as np
import torch

from ..errors import FewshotError
from .envs import BernoulliBandit, Tasks, Trajectories, rollout

#: largest horizon the Gittins table is computed for (its cost grows as grid x n^3 / 6)
GITTINS_MAX_N = 200


def _argmax_random_ties(score: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Index of the largest entry along the last axis, a uniformly random one among exact ties."""
    best = score >= score.max(-1, keepdim=True).values
    keys = torch.rand(score.shape, generator=generator, device=score.device).masked_fill(~best, -1.0)
    return keys.argmax(-1)


@lru_cache(maxsize=8)
def gittins_table(n: int, grid: int = 1025) -> np.ndarray:
    """Finite-horizon Gittins indices ``G[s, f, m]`` of a ``Beta(s + 1, f + 1)`` arm with ``m`` pulls left,
    for ``s + f <= n - m`` and ``1 <= m <= n`` (NaN elsewhere).

    For a known arm of reward ``lambda`` per pull, ``W_m(s, f) = max(lambda m, C_m(s, f))`` with
    ``C_m(s, f) = p (1 + W_{m-1}(s + 1, f)) + (1 - p) W_{m-1}(s, f + 1)``, ``p = (s + 1) / (s + f + 2)`` and
    ``W_0 = 0``: retiring to the known arm is final, since nothing more is learnt about it. The index is
    the ``lambda`` at which ``C_m = lambda m``. ``C_m - lambda m`` falls as ``lambda`` grows, so the root is
    bracketed on a grid of ``grid`` values in [0, 1] and found by linear interpolation between the two grid
    points around it (``C_m`` is piecewise linear in ``lambda``, so this is exact unless a kink falls inside
    the bracket; tested against exact bisection). ``G[s, f, 1]`` is the posterior mean exactly. Layer ``m``
    needs only the states ``s + f <= n - m``, so the work is about ``grid * n^3 / 3``.
    """
    n = int(n)
    if n > GITTINS_MAX_N:
        raise FewshotError(f"the Gittins table is computed for at most {GITTINS_MAX_N} pulls, got n={n}; "
                           "use thompson or ucb1 for longer episodes")
    lam = np.linspace(0.0, 1.0, int(grid))
    step = lam[1] - lam[0]
    G = np.full((n + 1, n + 1, n + 1), np.nan)
    W = np.zeros((len(lam), n + 1, n + 1))          # W_0 over s, f in 0..n
    for m in range(1, n + 1):
        r = n - m + 1                                # states s, f in 0..n-m
        s = np.arange(r)[:, None]
        f = np.arange(r)[None, :]
        p = (s + 1.0) / (s + f + 2.0)
        C = p * (1.0 + W[:, 1:r + 1, :r]) + (1.0 - p) * W[:, :r, 1:r + 1]
        if m == 1:
            root = np.broadcast_to(p, (r, r))        # one pull left: the posterior mean, exactly
        else:
            D = C - lam[:, None, None] * m           # decreasing in lambda; D(0) = C >= 0
            i = np.clip((D >= 0).sum(0) - 1, 0, len(lam) - 2)
            d0 = np.take_along_axis(D, i[None], 0)[0]
            d1 = np.take_along_axis(D, (i + 1)[None], 0)[0]
            with np.errstate(divide="ignore", invalid="ignore"):
                root = np.where(d0 - d1 > 0, lam[i] + step * d0 / (d0 - d1), lam[i])
        valid = (s + f) <= n - m
        G[:r, :r, m] = np.where(valid, np.clip(root, 0.0, 1.0), np.nan)
        W = np.maximum(lam[:, None, None] * m, C)
    return G


@lru_cache(maxsize=8)
def bayes_optimal_2arm(n: int) -> tuple:
    """The exact Bayes-optimal policy of a two-armed Bernoulli bandit with uniform priors and ``n`` pulls.

    Returns ``(value, policy)``: ``value`` is the optimal expected total reward (averaged over the prior),
    ``policy[t]`` a bool array over the states ``(s1, f1, s2)`` after ``t`` pulls (``f2 = t - s1 - f1 - s2``)
    that is True where pulling arm 2 is optimal (arm 1 on ties). Backward induction over the total pulls
    ``t``, one 3-D layer at a time."""
    n = int(n)
    if n < 1:
        raise FewshotError(f"n must be at least 1, got {n}")
    V = np.zeros((n + 1, n + 1, n + 1))            # value with 0 pulls left, states of layer t = n
    policy = [None] * n
    for t in range(n - 1, -1, -1):
        sz = t + 1
        s1 = np.arange(sz)[:, None, None]
        f1 = np.arange(sz)[None, :, None]
        s2 = np.arange(sz)[None, None, :]
        f2 = t - s1 - f1 - s2
        valid = f2 >= 0
        f2c = np.clip(f2, 0, None)
        p1 = (s1 + 1.0) / (s1 + f1 + 2.0)
        p2 = (s2 + 1.0) / (s2 + f2c + 2.0)
        # V holds layer t + 1 indexed [s1, f1, s2] (f2 implied)
        s1b, f1b, s2b = np.broadcast_arrays(s1, f1, s2)
        Vn = lambda a, b, c: V[np.clip(a, 0, n), np.clip(b, 0, n), np.clip(c, 0, n)]  # noqa: E731
        q1 = p1 * (1 + Vn(s1b + 1, f1b, s2b)) + (1 - p1) * Vn(s1b, f1b + 1, s2b)
        q2 = p2 * (1 + Vn(s1b, f1b, s2b + 1)) + (1 - p2) * Vn(s1b, f1b, s2b)
        best = np.where(valid, np.maximum(q1, q2), 0.0)
        policy[t] = valid & (q2 > q1 + 1e-12)
        Vt = np.zeros((n + 1, n + 1, n + 1))
        Vt[:sz, :sz, :sz] = best
        V = Vt
    return float(V[0, 0, 0]), tuple(policy)


def make_policy(name: str, bandit: BernoulliBandit, generator: torch.Generator) -> Callable:
    """A policy ``(s, f, t) -> arm [B, R]`` for ``bandit`` (see the module docstring for the names)."""
    k, n = bandit.k, bandit.n
    if name == "random":
        return lambda s, f, t: torch.randint(k, s.shape[:-1], generator=generator, device=s.device)
    if name == "greedy":
        return lambda s, f, t: _argmax_random_ties((s + 1) / (s + f + 2), generator)
    if name == "ucb1":
        def ucb1(s, f, t):
            pulls = s + f
            with torch.no_grad():
                bonus = torch.sqrt(2 * torch.log(torch.tensor(max(t, 1), dtype=s.dtype)) / pulls.clamp(min=1))
                score = torch.where(pulls > 0, s / pulls.clamp(min=1) + bonus, torch.full_like(s, float("inf")))
            return _argmax_random_ties(score, generator)
        return ucb1
    if name == "thompson":
        seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
        rng = np.random.default_rng(seed)
        return lambda s, f, t: torch.from_numpy(
            rng.beta(s.cpu().numpy() + 1, f.cpu().numpy() + 1).argmax(-1)).to(s.device)
    if name == "gittins":
        table = torch.from_numpy(gittins_table(n)).to(torch.float64)

        def gittins(s, f, t):
            si, fi = s.long().cpu(), f.long().cpu()
            idx = table[si, fi, n - t]
            return _argmax_random_ties(idx.to(s.device), generator)
        return gittins
    if name == "bayes":
        if k != 2:
            raise FewshotError(f"the exact Bayes-optimal policy is computed for 2 arms; this bandit has {k} "
                               "(use gittins)")
        _, pol = bayes_optimal_2arm(n)
        layers = [torch.from_numpy(p) for p in pol]

        def bayes(s, f, t):
            si, fi = s.long().cpu(), f.long().cpu()
            arm2 = layers[t][si[..., 0], fi[..., 0], si[..., 1]]
            return arm2.long().to(s.device)
        return bayes
    raise FewshotError(f"unknown bandit policy {name!r}; choose from {', '.join(POLICIES)}")


POLICIES = ("random", "greedy", "ucb1", "thompson", "gittins", "bayes")


def run_policy(name: str, bandit: BernoulliBandit, tasks: Tasks, rollouts: int, seed: int = 0,
               policy_seed: int = 1) -> Trajectories:
    """Play policy ``name`` for ``rollouts`` episodes of every task; rewards come from a generator seeded
    with ``seed`` (the same draws for every policy), the policy's own randomness from ``policy_seed``.
    One Python step per pull, each for all ``B x R`` episodes."""
    device = tasks["p"].device
    policy = make_policy(name, bandit, torch.Generator(device=device).manual_seed(policy_seed))
    env_g = torch.Generator(device=device).manual_seed(seed)
    k, n = bandit.k, bandit.n
    # the observation holds the counts: successes, failures (and the pull number), divided by n
    return rollout(bandit, tasks, lambda obs, t: policy((obs[..., :k] * n).round(), (obs[..., k:2 * k] * n).round(),
                                                        t), rollouts, env_g)


def compare(bandit: BernoulliBandit, tasks: Tasks, rollouts: int, policies=None, seed: int = 0) -> Dict[str, tuple]:
    """``{policy: (mean total reward per episode, 95% CI)}`` over the tasks (each task's mean over its
    rollouts is one sample), plus ``"oracle"``: the expected total reward of always pulling the best arm."""
    out = {}
    names = policies or [p for p in POLICIES if p != "bayes" or bandit.k == 2]
    for name in names:
        if name == "gittins" and bandit.n > GITTINS_MAX_N:
            continue
        per_task = run_policy(name, bandit, tasks, rollouts, seed=seed).returns.mean(1).double()
        out[name] = (float(per_task.mean()), 1.96 * float(per_task.std()) / len(per_task) ** 0.5)
    opt = bandit.optimal_return(tasks).double()
    out["oracle"] = (float(opt.mean()), 1.96 * float(opt.std()) / len(opt) ** 0.5)
    return out
