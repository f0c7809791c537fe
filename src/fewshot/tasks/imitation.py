"""Meta-imitation task families: ``--data reach`` (one-shot imitation of 2-D reaching, Finn et al. 2017b).

A task's examples are expert demonstrations: the support set holds ``shots`` demonstrations (observations
``[B, shots*T, O]``, actions ``[B, shots*T, 2]``), the query set ``queries`` other demonstrations of the same
task (other start positions, the targets listed in another order). A gradient-based method adapts on the
support demonstrations with the behaviour-cloning loss (``--loss bc``) and is meta-trained on the query ones
(MIL); any
method whose ``predict(support_x, support_y, query_x)`` returns actions can be evaluated.

Evaluation is closed-loop (:meth:`ImitationTasks.evaluate_episode`): the method, given one task's support
demonstrations, acts from the task's own start position for ``horizon`` steps, and the task counts as a
success when the agent stays within ``tolerance`` of the demonstrated target for the last ``last`` steps.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..episodes import Episode
from ..rl.envs import rollout
from .base import EnvTaskFamily


class ImitationTasks(EnvTaskFamily):
    name = "reach"
    metric = "success"
    metric_label = "% success"

    def __init__(self, shots: int = 1, queries: int = 1, batch: int = 10, device="cpu", seed: int = 0,
                 ways: Optional[int] = None, env: str = "reach"):
        super().__init__(shots, queries, batch, device, seed, ways, env)
        self.outputs = self.env.action_dim

    def sample(self, batch: Optional[int] = None) -> Episode:
        B, K, Q = batch or self.batch, self.shots, self.queries
        tasks = self.env.sample_tasks(B, self.generator)
        obs, act = self.env.demonstrations(tasks, K + Q, self.generator)
        T = self.env.horizon
        sx, sy = obs[:, :K].reshape(B, K * T, -1), act[:, :K].reshape(B, K * T, -1)
        qx, qy = obs[:, K:].reshape(B, Q * T, -1), act[:, K:].reshape(B, Q * T, -1)
        extra = {f"task:{k}": v for k, v in tasks.items()}
        return Episode(sx, sy, qx, qy, 0, K, Q, extra=extra)

    @torch.no_grad()
    def evaluate_episode(self, method, episode: Episode) -> torch.Tensor:
        """Closed-loop success (in %) of each task ``[B]``: at every step the method predicts the action for
        the current observation from the task's support demonstrations (``method.predict``)."""
        tasks = self.task_params(episode)
        sx, sy = episode.support_x, episode.support_y

        def policy(obs, t):
            return method.predict(sx, sy, obs).float()

        traj = rollout(self.env, tasks, policy, 1, self.generator)
        return 100 * self.env.success(tasks, traj)[:, 0]

    def __repr__(self) -> str:
        return f"ImitationTasks({self.env!r}, {self.shots} + {self.queries} demonstrations, batch {self.batch})"
