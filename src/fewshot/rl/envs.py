"""Reinforcement-learning task families, vectorised over tasks and rollouts.

A :class:`TaskSource` is a family of environments with a task parameter (the arms' success probabilities
of a bandit, the goal of a point robot). Everything is tensor code on a leading ``[B, R]`` (tasks,
rollouts) axis pair: one Python step of :func:`rollout` advances every rollout of every task at once, so
there is no Python loop per environment step per task.

- :class:`BernoulliBandit` (``bandit:k=5,n=100``): ``k`` arms with success probabilities ``p ~ U(0, 1)``
  per task, ``n`` pulls per episode (the RL^2 / pytorch-maml-rl setting). The observation is what the
  episode has shown so far, its sufficient statistics: each arm's successes and failures and the pull
  number, all divided by ``n``, and each arm's posterior mean and a count-based uncertainty (so a policy
  can learn within the episode, as the classical bandit policies do); the action is an arm index; the
  reward is a Bernoulli(p_arm) draw.
- :class:`Navigation2D` (``navigation2d``): the MAML paper's point robot. Goal ``~ U[-0.5, 0.5]^2``, start
  at the origin, action = velocity clipped to ``[-0.1, 0.1]`` per coordinate, reward ``-||x' - goal||``
  after the move, at most 100 steps; an episode ends once the robot is within 0.01 (Euclidean) of the
  goal, and later steps give reward 0 and are masked out. ``navigation2d:goal=1`` adds the goal to the
  observation (the input of the MAML paper's oracle policy).

A user plugs in their own family by subclassing :class:`TaskSource` (``sample_tasks``, ``reset``,
``step``); :class:`GymnasiumSource` wraps any gymnasium environment whose task parameter can be set.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..errors import FewshotError

Tasks = Dict[str, torch.Tensor]


@dataclass
class Trajectories:
    """Rollouts of ``B`` tasks x ``R`` rollouts x ``T`` steps.

    ``obs`` ``[B, R, T, obs_dim]`` (the observation each action was taken in), ``actions`` ``[B, R, T]``
    (discrete) or ``[B, R, T, action_dim]``, ``rewards`` ``[B, R, T]``, ``mask`` ``[B, R, T]`` (1 while the
    episode was running, 0 after it ended)."""
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor

    @property
    def returns(self) -> torch.Tensor:
        """Undiscounted return of each rollout ``[B, R]``."""
        return (self.rewards * self.mask).sum(-1)

    @property
    def steps(self) -> int:
        """Environment steps actually taken (masked steps excluded)."""
        return int(self.mask.sum())


class TaskSource(abc.ABC):
    """A family of tasks for reinforcement learning.

    Subclasses set ``name``, ``obs_dim``, ``horizon`` and either ``n_actions`` (discrete actions) or
    ``action_dim`` (continuous), and implement :meth:`sample_tasks`, :meth:`reset` and :meth:`step`. Every
    tensor has a leading task axis ``B``; states and observations have a rollout axis ``R`` after it."""

    name: str = ""
    obs_dim: int = 1
    horizon: int = 1
    n_actions: Optional[int] = None     #: discrete actions (a categorical policy)
    action_dim: Optional[int] = None    #: continuous actions (a Gaussian policy)

    @property
    def discrete(self) -> bool:
        return self.n_actions is not None

    @abc.abstractmethod
    def sample_tasks(self, n: int, generator: torch.Generator) -> Tasks:
        """Parameters of ``n`` tasks, each a tensor with leading axis ``n``."""

    @abc.abstractmethod
    def reset(self, tasks: Tasks, rollouts: int, generator: Optional[torch.Generator] = None) -> tuple:
        """``(state, obs [B, R, obs_dim])`` at the start of ``rollouts`` episodes of every task (``generator``
        for sources whose start is random)."""

    @abc.abstractmethod
    def step(self, tasks: Tasks, state, action: torch.Tensor, generator: torch.Generator) -> tuple:
        """``(state, obs, reward [B, R], done [B, R])`` after ``action`` ([B, R] or [B, R, action_dim])."""

    def optimal_return(self, tasks: Tasks) -> Optional[torch.Tensor]:
        """Expected return of the best policy that knows the task ``[B]`` (an oracle), when known."""
        return None


class BernoulliBandit(TaskSource):
    """``k``-armed Bernoulli bandit, ``n`` pulls per episode, arm probabilities ``U(0, 1)`` per task.

    The observation is the sufficient statistic of the episode so far, in the forms the classical index
    policies read: each arm's successes and failures and the pull number over ``n``, then each arm's
    posterior mean under the uniform prior, ``(s + 1) / (s + f + 2)``, and its uncertainty
    ``1 / sqrt(s + f + 1)`` (``4k + 1`` values). Greedy, UCB-like and Thompson-like rules are then simple
    functions of the input rather than ratios a ReLU network has to learn to divide out."""

    name = "bandit"

    def __init__(self, k: int = 5, n: int = 100):
        if int(k) < 2:
            raise FewshotError(f"a bandit needs at least 2 arms, got k={k}")
        if int(n) < 1:
            raise FewshotError(f"a bandit episode needs at least 1 pull, got n={n}")
        self.k, self.n = int(k), int(n)
        self.n_actions, self.horizon = self.k, self.n
        self.obs_dim = 4 * self.k + 1

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tasks:
        return {"p": torch.rand(n, self.k, generator=generator, device=generator.device)}

    def _obs(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        pulls = s + f
        t = pulls.sum(-1, keepdim=True)
        return torch.cat([s / self.n, f / self.n, t / self.n, (s + 1) / (pulls + 2), (pulls + 1).rsqrt()], -1)

    def reset(self, tasks: Tasks, rollouts: int, generator: Optional[torch.Generator] = None) -> tuple:
        p = tasks["p"]
        s = p.new_zeros(p.shape[0], rollouts, self.k)
        return (s, s.clone()), self._obs(s, s)

    def step(self, tasks: Tasks, state, action: torch.Tensor, generator: torch.Generator) -> tuple:
        """Pull ``action`` ``[B, R]``; the state is each rollout's successes and failures per arm."""
        p = tasks["p"]
        pa = p.gather(1, action.long()).to(p.dtype)           # [B, R]
        reward = (torch.rand(pa.shape, generator=generator, device=p.device) < pa).to(p.dtype)
        s, f = state
        arm = torch.nn.functional.one_hot(action.long(), self.k).to(p.dtype)
        s, f = s + arm * reward.unsqueeze(-1), f + arm * (1 - reward).unsqueeze(-1)
        return (s, f), self._obs(s, f), reward, torch.zeros_like(reward, dtype=torch.bool)

    def optimal_return(self, tasks: Tasks) -> torch.Tensor:
        return self.n * tasks["p"].max(1).values

    def __repr__(self) -> str:
        return f"BernoulliBandit(k={self.k}, n={self.n})"


class Navigation2D(TaskSource):
    """The MAML paper's 2-D point robot (Finn et al. 2017, section 5.3). The observation is the position;
    with ``goal`` (``navigation2d:goal=1``) it is the position and the goal, the input of the paper's
    oracle policy, which a policy then learns to reach without adapting."""

    name = "navigation2d"
    action_dim = 2

    def __init__(self, horizon: int = 100, goal_range: float = 0.5, max_speed: float = 0.1,
                 tolerance: float = 0.01, goal: int = 0):
        if int(horizon) < 1:
            raise FewshotError(f"navigation episodes need at least 1 step, got horizon={horizon}")
        if int(goal) not in (0, 1):
            raise FewshotError(f"navigation2d:goal must be 0 (the position only) or 1 (position and goal), got {goal}")
        self.horizon, self.goal_range = int(horizon), float(goal_range)
        self.max_speed, self.tolerance = float(max_speed), float(tolerance)
        self.observe_goal = bool(goal)
        self.obs_dim = 4 if self.observe_goal else 2

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tasks:
        u = torch.rand(n, 2, generator=generator, device=generator.device)
        return {"goal": (2 * u - 1) * self.goal_range}

    def _obs(self, tasks: Tasks, pos: torch.Tensor) -> torch.Tensor:
        if not self.observe_goal:
            return pos
        return torch.cat([pos, tasks["goal"].unsqueeze(1).expand_as(pos)], -1)

    def reset(self, tasks: Tasks, rollouts: int, generator: Optional[torch.Generator] = None) -> tuple:
        g = tasks["goal"]
        pos = g.new_zeros(g.shape[0], rollouts, 2)
        return pos, self._obs(tasks, pos)

    def step(self, tasks: Tasks, state, action: torch.Tensor, generator: torch.Generator) -> tuple:
        pos = state + action.clamp(-self.max_speed, self.max_speed)
        dist = (pos - tasks["goal"].unsqueeze(1)).norm(dim=-1)
        return pos, self._obs(tasks, pos), -dist, dist < self.tolerance

    def oracle_action(self, tasks: Tasks, obs: torch.Tensor) -> torch.Tensor:
        """The best action when the goal is known: the clipped step towards it. Each coordinate's
        distance to the goal then shrinks as fast as the speed limit allows, so every step's distance is
        the smallest reachable and the return is the highest possible."""
        return (tasks["goal"].unsqueeze(1) - obs[..., :2]).clamp(-self.max_speed, self.max_speed)

    def optimal_return(self, tasks: Tasks) -> torch.Tensor:
        g = torch.Generator(device=tasks["goal"].device)
        traj = rollout(self, tasks, lambda obs, t: self.oracle_action(tasks, obs), 1, g)
        return traj.returns[:, 0]

    def __repr__(self) -> str:
        return f"Navigation2D(horizon={self.horizon}" + (", goal=1)" if self.observe_goal else ")")


class Reach2D(TaskSource):
    """Reaching one of ``targets`` points in the plane, where only a demonstration says which (the
    one-shot imitation setting of Finn et al. 2017b, in 2-D).

    A task is ``targets`` positions ``~ U[-0.5, 0.5]^2`` (at least ``separation`` apart), the index of the
    one to reach, and a start position ``~ U[-0.2, 0.2]^2``. The observation is the agent's position and
    every target's position ``[x, y, t1x, t1y, ...]``; the action is a velocity clipped to ``max_speed``;
    the reward is minus the distance to the true target. An episode lasts ``horizon`` steps and succeeds
    when the agent stays within ``tolerance`` of the true target for the last ``last`` steps (the MIL
    code's criterion). :meth:`demonstrations` draws expert demonstrations of a task from other start
    positions, with the targets listed in a different order each time."""

    name = "reach"
    action_dim = 2

    def __init__(self, targets: int = 3, horizon: int = 20, max_speed: float = 0.1, tolerance: float = 0.05,
                 last: int = 10, separation: float = 0.2):
        if int(targets) < 1:
            raise FewshotError(f"reaching needs at least 1 target, got targets={targets}")
        if int(horizon) < int(last) or int(last) < 1:
            raise FewshotError(f"reaching needs horizon >= last >= 1, got horizon={horizon}, last={last}")
        self.targets, self.horizon, self.last = int(targets), int(horizon), int(last)
        self.max_speed, self.tolerance, self.separation = float(max_speed), float(tolerance), float(separation)
        self.obs_dim = 2 + 2 * self.targets

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tasks:
        dev = generator.device
        tries = 16                                   # rejection sampling, vectorised over tries
        cand = torch.rand(n, tries, self.targets, 2, generator=generator, device=dev) - 0.5
        d = (cand.unsqueeze(2) - cand.unsqueeze(3)).norm(dim=-1)
        d = d + torch.eye(self.targets, device=dev) * 10
        ok = d.flatten(2).min(-1).values >= self.separation
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), tries - 1, device=dev))
        targets = cand[torch.arange(n, device=dev), first]
        index = torch.randint(self.targets, (n,), generator=generator, device=dev)
        start = (torch.rand(n, 2, generator=generator, device=dev) - 0.5) * 0.4
        return {"targets": targets, "index": index, "start": start}

    def goal(self, tasks: Tasks) -> torch.Tensor:
        return tasks["targets"][torch.arange(len(tasks["index"])), tasks["index"]]

    def _obs(self, pos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B, R, 2 + 2n]`` from positions ``[B, R, 2]`` and (per-rollout) target lists ``[B, R, n, 2]``."""
        return torch.cat([pos, targets.flatten(-2)], -1)

    def reset(self, tasks: Tasks, rollouts: int, generator: Optional[torch.Generator] = None) -> tuple:
        B = tasks["start"].shape[0]
        pos = tasks["start"].unsqueeze(1).expand(B, rollouts, 2).clone()
        tg = tasks["targets"].unsqueeze(1).expand(B, rollouts, self.targets, 2)
        return (pos, tg), self._obs(pos, tg)

    def step(self, tasks: Tasks, state, action: torch.Tensor, generator: torch.Generator) -> tuple:
        pos, tg = state
        pos = pos + action.clamp(-self.max_speed, self.max_speed)
        dist = (pos - self.goal(tasks).unsqueeze(1)).norm(dim=-1)
        return (pos, tg), self._obs(pos, tg), -dist, torch.zeros_like(dist, dtype=torch.bool)

    def success(self, tasks: Tasks, traj: Trajectories) -> torch.Tensor:
        """``[B, R]`` 1.0 where the rollout stayed within ``tolerance`` of the true target for its last
        ``last`` steps. (``rewards`` are minus the distance after each step.)"""
        return (-traj.rewards[..., -self.last:] < self.tolerance).all(-1).float()

    def expert_action(self, goal: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """The scripted expert: the clipped step straight to the goal ``[B, 2]`` (it then stays there)."""
        return (goal.unsqueeze(1) - obs[..., :2]).clamp(-self.max_speed, self.max_speed)

    def demonstrations(self, tasks: Tasks, n: int, generator: torch.Generator) -> tuple:
        """``n`` expert demonstrations per task, each from a fresh start ``~ U[-0.2, 0.2]^2`` with the targets
        listed in a fresh random order: observations ``[B, n, T, O]`` and actions ``[B, n, T, 2]``."""
        B, dev = tasks["targets"].shape[0], tasks["targets"].device
        order = torch.rand(B, n, self.targets, generator=generator, device=dev).argsort(-1)
        tg = tasks["targets"].unsqueeze(1).expand(B, n, self.targets, 2).gather(
            2, order.unsqueeze(-1).expand(B, n, self.targets, 2))
        pos = (torch.rand(B, n, 2, generator=generator, device=dev) - 0.5) * 0.4
        goal = self.goal(tasks)
        obs, act = [], []
        for _ in range(self.horizon):
            o = self._obs(pos, tg)
            a = self.expert_action(goal, o)
            obs.append(o)
            act.append(a)
            pos = pos + a
        return torch.stack(obs, 2), torch.stack(act, 2)

    def __repr__(self) -> str:
        return f"Reach2D(targets={self.targets}, horizon={self.horizon})"


class GymnasiumSource(TaskSource):
    """Any gymnasium environment with a task parameter, as a :class:`TaskSource`.

    ``make_env(task)`` builds (or re-parameterises) one environment for a task parameter vector (a 1-D
    tensor); ``sample_task(generator)`` draws one. Rollouts step ``B x R`` environments one after another
    (gymnasium environments are not batched), so this source is for plugging in simulators, not for speed.
    """

    def __init__(self, make_env: Callable, sample_task: Callable, horizon: int, name: str = "gymnasium"):
        try:
            import gymnasium  # noqa: F401
        except ImportError:
            raise FewshotError("GymnasiumSource needs gymnasium: pip install 'fewshot[rl]'") from None
        self.make_env, self.sample_task, self.horizon, self.name = make_env, sample_task, int(horizon), name
        probe = make_env(sample_task(torch.Generator()))
        space = probe.action_space
        self.obs_dim = int(math.prod(probe.observation_space.shape))
        if hasattr(space, "n"):
            self.n_actions = int(space.n)
        else:
            self.action_dim = int(math.prod(space.shape))
            self.low = torch.as_tensor(space.low, dtype=torch.float32)
            self.high = torch.as_tensor(space.high, dtype=torch.float32)
        probe.close()

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tasks:
        return {"task": torch.stack([torch.as_tensor(self.sample_task(generator), dtype=torch.float32)
                                     for _ in range(n)])}

    def reset(self, tasks: Tasks, rollouts: int, generator: Optional[torch.Generator] = None) -> tuple:
        import numpy as np
        envs = [[self.make_env(t) for _ in range(rollouts)] for t in tasks["task"]]
        seeds = torch.randint(2 ** 31 - 1, (len(envs), rollouts), generator=generator).tolist()
        obs = np.array([[np.asarray(env.reset(seed=s)[0], dtype=np.float32).ravel() for env, s in zip(row, srow)]
                        for row, srow in zip(envs, seeds)])
        return envs, torch.from_numpy(obs)

    def step(self, tasks: Tasks, state, action: torch.Tensor, generator: torch.Generator) -> tuple:
        obs, rew, done = [], [], []
        for b, row in enumerate(state):
            o_row, r_row, d_row = [], [], []
            for r, env in enumerate(row):
                a = action[b, r]
                a = int(a) if self.discrete else torch.max(torch.min(a.float(), self.high), self.low).numpy()
                o, rwd, term, trunc, _ = env.step(a)
                o_row.append(torch.as_tensor(o, dtype=torch.float32).flatten())
                r_row.append(float(rwd))
                d_row.append(bool(term or trunc))
            obs.append(torch.stack(o_row))
            rew.append(r_row)
            done.append(d_row)
        return state, torch.stack(obs), torch.tensor(rew), torch.tensor(done)


def rollout(source: TaskSource, tasks: Tasks, policy: Callable, rollouts: int,
            generator: torch.Generator) -> Trajectories:
    """Run ``policy(obs [B, R, obs_dim], t) -> action`` for ``rollouts`` episodes of every task.

    One Python iteration per time step, each advancing all ``B x R`` episodes; an episode that has ended
    keeps stepping but its steps are masked out (reward 0)."""
    state, obs = source.reset(tasks, rollouts, generator)
    B = obs.shape[0]
    running = torch.ones(B, rollouts, dtype=torch.bool, device=obs.device)
    all_obs, all_act, all_rew, all_mask = [], [], [], []
    for t in range(source.horizon):
        action = policy(obs, t)
        all_obs.append(obs)
        all_act.append(action)
        state, obs, reward, done = source.step(tasks, state, action, generator)
        all_mask.append(running)
        all_rew.append(reward * running)
        running = running & ~done
    mask = torch.stack(all_mask, 2).to(all_rew[0].dtype)
    return Trajectories(torch.stack(all_obs, 2), torch.stack(all_act, 2), torch.stack(all_rew, 2), mask)


def parse_options(spec: str, allowed: dict) -> dict:
    """``"bandit:k=5,n=100"`` -> ``{"k": 5, "n": 100}`` with integer values; keys must be in ``allowed``
    (name -> default)."""
    name, _, rest = str(spec).partition(":")
    out = dict(allowed)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise FewshotError(f"bad task spec {spec!r}: expected {name}:" +
                               ",".join(f"{k}=N" for k in allowed))
        try:
            out[key] = int(value)
        except ValueError:
            raise FewshotError(f"bad task spec {spec!r}: {key} must be an integer, got {value!r}") from None
    return out


SOURCES = {"bandit": BernoulliBandit, "navigation2d": Navigation2D, "reach": Reach2D}


def make_source(spec: str) -> TaskSource:
    """A task source from a ``--data`` string: ``bandit[:k=K,n=N]``, ``navigation2d[:horizon=T,goal=0|1]`` or
    ``reach[:targets=N,horizon=T]``."""
    name = str(spec).partition(":")[0]
    if name == "bandit":
        return BernoulliBandit(**parse_options(spec, {"k": 5, "n": 100}))
    if name == "navigation2d":
        return Navigation2D(**parse_options(spec, {"horizon": 100, "goal": 0}))
    if name == "reach":
        return Reach2D(**parse_options(spec, {"targets": 3, "horizon": 20}))
    raise FewshotError(f"unknown RL task family {spec!r}; choose from {', '.join(SOURCES)}")
