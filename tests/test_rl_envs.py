"""RL task families and the classical bandit policies: exact values on tiny cases, reproducibility."""
from functools import lru_cache

import pytest
import torch

from fewshot.errors import FewshotError
from fewshot.rl import (BernoulliBandit, Navigation2D, bayes_optimal_2arm, compare, gittins_table,
                        make_source, rollout, run_policy)


def _bayes_value_bruteforce(n: int) -> float:
    """Expectimax over posterior states of two Beta(1, 1) arms, written independently of the DP."""
    @lru_cache(maxsize=None)
    def v(s1, f1, s2, f2, left):
        if left == 0:
            return 0.0
        p1, p2 = (s1 + 1) / (s1 + f1 + 2), (s2 + 1) / (s2 + f2 + 2)
        q1 = p1 * (1 + v(s1 + 1, f1, s2, f2, left - 1)) + (1 - p1) * v(s1, f1 + 1, s2, f2, left - 1)
        q2 = p2 * (1 + v(s1, f1, s2 + 1, f2, left - 1)) + (1 - p2) * v(s1, f1, s2, f2 + 1, left - 1)
        return max(q1, q2)
    return v(0, 0, 0, 0, n)


def _gittins_bisection(s, f, m):
    def w(s, f, m, lam, memo):
        if m == 0:
            return 0.0
        if (s, f, m) not in memo:
            p = (s + 1) / (s + f + 2)
            c = p * (1 + w(s + 1, f, m - 1, lam, memo)) + (1 - p) * w(s, f + 1, m - 1, lam, memo)
            memo[(s, f, m)] = max(lam * m, c)
        return memo[(s, f, m)]
    lo, hi = 0.0, 1.0
    for _ in range(50):
        lam, memo = (lo + hi) / 2, {}
        p = (s + 1) / (s + f + 2)
        c = p * (1 + w(s + 1, f, m - 1, lam, memo)) + (1 - p) * w(s, f + 1, m - 1, lam, memo)
        lo, hi = (lam, hi) if c >= lam * m else (lo, lam)
    return lo


def test_bayes_optimal_hand_values():
    assert bayes_optimal_2arm(1)[0] == pytest.approx(0.5)
    # pull arm 1; after a success (p 1/2) keep it (mean 2/3), after a failure switch (mean 1/2)
    assert bayes_optimal_2arm(2)[0] == pytest.approx(0.5 + 0.5 * 2 / 3 + 0.5 * 0.5)
    for n in (3, 5, 8):
        assert bayes_optimal_2arm(n)[0] == pytest.approx(_bayes_value_bruteforce(n), abs=1e-12)


def test_gittins_index_hand_values_and_bisection():
    G = gittins_table(8)
    assert G[0, 0, 1] == pytest.approx(0.5)
    # two pulls left: stop after a failure -> (1/2 + 1/2 * 2/3) / (1 + 1/2) = 5/9
    assert G[0, 0, 2] == pytest.approx(5 / 9, abs=1e-6)
    for (s, f, m) in [(0, 0, 8), (2, 1, 5), (0, 3, 4), (4, 0, 3), (1, 1, 6)]:
        assert G[s, f, m] == pytest.approx(_gittins_bisection(s, f, m), abs=1e-4)


def test_simulated_bayes_policy_matches_its_exact_value():
    bandit = BernoulliBandit(2, 10)
    tasks = bandit.sample_tasks(4000, torch.Generator().manual_seed(3))   # tasks from the prior itself
    ret = run_policy("bayes", bandit, tasks, rollouts=4, seed=7).returns.mean(1).double()
    exact = bayes_optimal_2arm(10)[0]
    ci = 1.96 * float(ret.std()) / len(ret) ** 0.5
    assert abs(float(ret.mean()) - exact) < ci


def test_policies_rank_as_expected_on_held_out_tasks():
    bandit = BernoulliBandit(5, 50)
    tasks = bandit.sample_tasks(300, torch.Generator().manual_seed(11))
    res = compare(bandit, tasks, rollouts=8)
    assert res["random"][0] < res["ucb1"][0] < res["oracle"][0]
    assert res["gittins"][0] > res["random"][0] + 8        # learning within the episode pays
    assert res["gittins"][0] >= res["thompson"][0] - res["thompson"][1]


def test_bandit_episodes_reproducible_from_seed():
    bandit = make_source("bandit:k=3,n=20")
    t1 = bandit.sample_tasks(5, torch.Generator().manual_seed(0))
    t2 = bandit.sample_tasks(5, torch.Generator().manual_seed(0))
    assert torch.equal(t1["p"], t2["p"])
    a = run_policy("thompson", bandit, t1, 3, seed=4)
    b = run_policy("thompson", bandit, t2, 3, seed=4)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.rewards, b.rewards)


def test_navigation_oracle_and_masking():
    nav = Navigation2D()
    tasks = {"goal": torch.tensor([[0.35, 0.0], [-0.2, 0.1]])}
    traj = rollout(nav, tasks, lambda obs, t: nav.oracle_action(tasks, obs), 2, torch.Generator())
    # goal (0.35, 0): distances 0.25, 0.15, 0.05, 0 -> done after 4 steps, nothing counted afterwards
    assert traj.returns[0, 0].item() == pytest.approx(-0.45, abs=1e-6)
    assert traj.mask[0, 0].sum().item() == 4
    assert nav.optimal_return(tasks)[0].item() == pytest.approx(-0.45, abs=1e-6)
    # actions are clipped to the speed limit
    wild = rollout(nav, tasks, lambda obs, t: torch.full_like(obs, 5.0), 1, torch.Generator())
    assert wild.obs[0, 0, 1].tolist() == pytest.approx([0.1, 0.1])


def test_navigation_can_observe_the_goal():
    """navigation2d:goal=1 (the paper's oracle policy input): the observation is position then goal, the
    dynamics, rewards and the oracle's return are those of the plain family."""
    nav, plain = make_source("navigation2d:goal=1"), make_source("navigation2d")
    assert nav.obs_dim == 4 and plain.obs_dim == 2
    tasks = {"goal": torch.tensor([[0.35, 0.0], [-0.2, 0.1]])}
    traj = rollout(nav, tasks, lambda obs, t: nav.oracle_action(tasks, obs), 2, torch.Generator())
    assert torch.equal(traj.obs[..., 2:], tasks["goal"][:, None, None].expand(2, 2, traj.obs.shape[2], 2))
    assert torch.equal(nav.optimal_return(tasks), plain.optimal_return(tasks))


def test_navigation_random_policy_far_below_oracle():
    nav = make_source("navigation2d")
    g = torch.Generator().manual_seed(0)
    tasks = nav.sample_tasks(100, g)
    rand = rollout(nav, tasks, lambda obs, t: 0.2 * torch.rand(obs.shape, generator=g) - 0.1, 4, g)
    assert rand.returns.mean() < nav.optimal_return(tasks).mean() - 10


@pytest.mark.parametrize("spec", ["bandit:k=0", "bandit:k=1", "bandit:n=0", "bandit:k=x", "bandit:arms=3",
                                  "navigation2d:horizon=0", "navigation2d:goal=2", "maze"])
def test_bad_task_specs(spec):
    with pytest.raises(FewshotError) as e:
        make_source(spec)
    assert "\n" not in str(e.value)


def test_gymnasium_environment_with_a_task_parameter():
    gym = pytest.importorskip("gymnasium", reason="gymnasium is not installed (pip install 'fewshot[rl]')")
    from fewshot.rl import GymnasiumSource
    src = GymnasiumSource(lambda task: gym.make("Pendulum-v1", g=float(task[0])),
                          lambda g: 5 + 10 * torch.rand(1, generator=g), horizon=15)
    assert (src.obs_dim, src.action_dim, src.discrete) == (3, 1, False)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(4)
        tasks = src.sample_tasks(2, g)
        runs.append(rollout(src, tasks, lambda obs, t: torch.full((*obs.shape[:2], 1), 0.5), 3, g))
    assert runs[0].obs.shape == (2, 3, 15, 3)
    assert torch.equal(runs[0].rewards, runs[1].rewards)          # reproducible from the generator
    assert not torch.equal(runs[0].rewards[0], runs[0].rewards[1])  # another gravity, another episode
