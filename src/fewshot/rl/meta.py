"""Meta-reinforcement learning on the gradient-based family's inner loop (MAML-RL, Meta-SGD-RL, CAVIA-RL).

An RL episode (from :class:`fewshot.tasks.rl.RLTasks`) carries task parameters, not examples. Before the
usual meta-gradient machinery of :class:`fewshot.methods.gbml.GradientMethod` runs, :func:`rollout_episode`
turns it into the examples that machinery expects (Finn et al. 2017, section 3.2 / 5.3):

1. ``shots`` rollouts per task with the meta-parameters ``theta`` (all tasks and rollouts at once);
2. their observations and packed ``(action, advantage, weight)`` targets (:mod:`fewshot.rl.pg`) become
   the support set, and the inner loop takes a policy-gradient step on it: ``theta'_i``;
3. ``queries`` fresh rollouts per task with the adapted ``theta'_i`` (one vmapped forward over tasks per
   time step) become the query set, whose policy-gradient loss is the outer objective.

With ``inner_steps`` S > 1 each step gets rollouts of its own, drawn with the parameters after the steps
before it (the support set then has a leading step axis). The outer step is either the trainer's optimiser
(Adam) on this policy-gradient meta-objective (``outer: gradient``, the "VPG outer step" of the meta-RL
literature) or the paper's TRPO (``outer: trpo``, :mod:`fewshot.rl.trpo`: the method computes the
trust-region step and hands it to the trainer as its loss's gradient, for plain SGD at rate 1); either way
the trainer, the checkpoints and the resume logic stay the ones every method uses. As in the MAML paper,
the meta-gradient flows through the inner update (second order unless ``first_order``) but not through
the dependence of the inner rollouts' distribution on ``theta``.

All randomness (task draws, actions, environment noise) comes from the task family's generator, which is
checkpointed: resume is exact like every other family's.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch.func import vmap

from ..episodes import Episode
from ..errors import FewshotError
from ..tasks.base import EnvTaskFamily
from .envs import TaskSource, Trajectories, rollout
from .pg import advantages, pack_targets, sample_action

Params = Dict[str, torch.Tensor]


def is_rl(episode: Episode) -> bool:
    return isinstance(episode.extra.get("env"), TaskSource)


def loss_kind(env: TaskSource) -> str:
    return "pg-discrete" if env.discrete else "pg"


def _with_context(method, params: Params, device) -> Params:
    """CAVIA networks take their context as an input: zeros before adaptation."""
    if method.config.context and "context" not in params:
        dtype = method.net.head.weight.dtype
        return {**params, "context": torch.zeros(method.config.context, dtype=dtype, device=device)}
    return params


def collect(method, params: Params, env: TaskSource, tasks: dict, rollouts: int, generator: torch.Generator,
            per_task: bool = False) -> Trajectories:
    """Rollouts of the policy ``method.net`` with ``params`` (shared by every task, or stacked per task on a
    leading axis when ``per_task``), without gradients."""
    device = next(iter(tasks.values())).device
    discrete = env.discrete
    with torch.no_grad():
        if per_task:
            fwd = vmap(lambda p, o: method.forward_with(p, o)[0])

            def policy(obs, t):
                return sample_action(fwd(params, obs), discrete, generator)
        else:
            shared = _with_context(method, params, device)

            def policy(obs, t):
                out, _ = method.forward_with(shared, obs.reshape(-1, obs.shape[-1]))
                return sample_action(out.view(*obs.shape[:2], -1), discrete, generator)
        return rollout(env, tasks, policy, rollouts, generator)


def samples(env: TaskSource, traj: Trajectories, discount: float, baseline: bool = True) -> tuple:
    """Per-task examples of rollouts: observations ``[B, R*T, O]`` and packed targets ``[B, R*T, A + 2]``."""
    adv = advantages(traj.obs, traj.rewards, traj.mask, discount, baseline=baseline)
    y = pack_targets(traj.actions, adv, traj.mask, env.discrete)
    B = traj.obs.shape[0]
    return traj.obs.reshape(B, -1, traj.obs.shape[-1]), y.reshape(B, -1, y.shape[-1])


def adapted(method, steps_x: torch.Tensor, steps_y: torch.Tensor, kind: str, params: Optional[Params] = None) -> Params:
    """Per-task parameters after ``S = steps_x.shape[1]`` inner steps from ``params`` (default the method's
    meta-parameters), step ``s`` on ``steps_x[:, s]`` (stacked on a leading task axis; no meta-gradient)."""
    with torch.enable_grad():
        return method.map_tasks("adapted_params", method.meta_params() if params is None else params,
                                steps_x, steps_y, kind=kind)


def adaptation_rollouts(method, env: TaskSource, tasks: dict, steps: int, rollouts: int,
                        generator: torch.Generator, discount: float, last_rollouts: Optional[int] = None) -> tuple:
    """Rollouts after 0, 1, ..., ``steps`` inner steps, each step adapting on the rollouts of the one
    before: returns ``(list of Trajectories, support x [B, S, M, O], support y [B, S, M, A+2])``.
    ``last_rollouts``: how many rollouts to draw after the last step (default ``rollouts``)."""
    kind = loss_kind(env)
    trajs, xs, ys = [], [], []
    for k in range(steps + 1):
        R = rollouts if k < steps or last_rollouts is None else last_rollouts
        if k == 0:
            traj = collect(method, method.meta_params(), env, tasks, R, generator)
        else:
            params = adapted(method, torch.stack(xs, 1), torch.stack(ys, 1), kind)
            traj = collect(method, params, env, tasks, R, generator, per_task=True)
        trajs.append(traj)
        if k < steps:
            x, y = samples(env, traj, discount, method.config.baseline)
            xs.append(x)
            ys.append(y)
    B = next(iter(tasks.values())).shape[0]
    empty = torch.zeros(B, 0, 0, 0)
    return trajs, (torch.stack(xs, 1) if xs else empty), (torch.stack(ys, 1) if ys else empty)


def rollout_episode(method, episode: Episode) -> Episode:
    """The examples behind one meta-training step of an RL episode (see the module docstring): support =
    the inner rollouts (a step axis when ``inner_steps`` > 1), query = rollouts after adaptation."""
    env, tasks, g = episode.extra["env"], EnvTaskFamily.task_params(episode), episode.extra["generator"]
    c = method.config
    trajs, sx, sy = adaptation_rollouts(method, env, tasks, c.inner_steps, episode.shots, g, c.discount,
                                        last_rollouts=episode.queries)
    qx, qy = samples(env, trajs[-1], c.discount, c.baseline)
    if c.inner_steps <= 1:          # one (or no) step: the support set without its step axis
        sx, sy = (sx[:, 0], sy[:, 0]) if c.inner_steps == 1 else (qx[:, :0], qy[:, :0])
    extra = {"loss": loss_kind(env), "per_step": c.inner_steps > 1,
             "return_before": trajs[0].returns.mean(1), "return_after": trajs[-1].returns.mean(1)}
    return Episode(sx, sy, qx, qy, 0, episode.shots, episode.queries, extra=extra)


def adapted_returns(method, episode: Episode, steps: Optional[int] = None) -> torch.Tensor:
    """Each task's mean return ``[B]`` over ``episode.queries`` rollouts after ``steps`` inner steps
    (default ``test_steps``, else ``inner_steps``), each step on ``episode.shots`` fresh rollouts."""
    c = method.config
    steps = (c.test_steps or c.inner_steps) if steps is None else steps
    trajs, _, _ = adaptation_rollouts(method, episode.extra["env"], EnvTaskFamily.task_params(episode), steps,
                                      episode.shots, episode.extra["generator"], c.discount,
                                      last_rollouts=episode.queries)
    return trajs[-1].returns.mean(1)


@torch.no_grad()
def evaluate_adaptation(method, family, n_tasks: int = 100, steps: Sequence[int] = (0, 1, 2, 3),
                        rollouts: Optional[int] = None, chunk: int = 100) -> dict:
    """Mean return ``(mean, 95% CI)`` over ``n_tasks`` held-out tasks after each number of inner steps in
    ``steps`` (each step adapting on ``rollouts`` fresh rollouts, default the family's ``shots``), drawn
    from ``family`` reset to its seed, so every method meets the same tasks; ``chunk`` tasks at a time."""
    from ..evaluate import mean_ci
    family.generator.manual_seed(family.seed)
    env = family.env
    tasks = env.sample_tasks(n_tasks, family.generator)
    R = rollouts or family.shots
    was = method.training
    method.eval()
    per_step = [[] for _ in range(max(steps) + 1)]
    try:
        for i in range(0, n_tasks, chunk):          # bounded memory; the same draws whatever the chunk
            part = {k: v[i:i + chunk] for k, v in tasks.items()}
            trajs, _, _ = adaptation_rollouts(method, env, part, max(steps), R, family.generator,
                                              method.config.discount)
            for k, traj in enumerate(trajs):
                per_step[k].extend(traj.returns.mean(1).double().tolist())
    finally:
        method.train(was)
    out = {}
    for k in steps:
        m, ci, _ = mean_ci(per_step[k])
        out[k] = (m, ci)
    return out


def check_rl_config(method) -> None:
    """RL needs a network without batch norm (rollout batches are not i.i.d. examples)."""
    if method.config.bn != "none":
        raise FewshotError(f"{method.name} on an RL task family needs --bn none (batch statistics of "
                           "rollout steps are not meaningful)")
