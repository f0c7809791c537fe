"""RL task families as samplers: ``--data bandit:k=5,n=100`` or ``--data navigation2d``.

A batch is an :class:`~fewshot.episodes.Episode` with no examples: its ``extra`` holds the task parameters
(``"task:p"`` arm probabilities, ``"task:goal"`` goals, ``[B, ...]``), the environment (``"env"``, a
:class:`fewshot.rl.envs.TaskSource`) and this sampler's generator (``"generator"``), from which a meta-RL
method draws its rollouts (:mod:`fewshot.rl.meta`) -- so the checkpointed sampler state makes resume exact.
``shots`` is the number of rollouts per task for each inner step, ``queries`` the number after adaptation.
"""
from __future__ import annotations

from typing import Optional

from ..episodes import Episode
from ..errors import FewshotError
from .base import EnvTaskFamily


class RLTasks(EnvTaskFamily):
    name = "rl"
    metric = "return"
    metric_label = "return"

    def __init__(self, shots: int = 20, queries: int = 20, batch: int = 20, device="cpu", seed: int = 0,
                 ways: Optional[int] = None, env: str = "navigation2d"):
        super().__init__(shots, queries, batch, device, seed, ways, env)
        self.outputs = self.env.n_actions if self.env.discrete else 2 * self.env.action_dim

    def sample(self, batch: Optional[int] = None) -> Episode:
        B = batch or self.batch
        tasks = self.env.sample_tasks(B, self.generator)
        empty = next(iter(tasks.values()))[:, :0]
        extra = {f"task:{k}": v for k, v in tasks.items()}
        extra.update(env=self.env, generator=self.generator)
        return Episode(empty, empty, empty, empty, 0, self.shots, self.queries, extra=extra)

    def evaluate_episode(self, method, episode: Episode):
        """Each task's mean return ``[B]`` after the method adapts with its ``test_steps`` policy-gradient
        steps on fresh rollouts (:func:`fewshot.rl.meta.adapted_returns`; gradient-based methods only)."""
        from ..rl.meta import adapted_returns, check_rl_config
        if not method.adapts_by_gradient:
            raise FewshotError(f"method {method.name} does not adapt by gradient steps; it cannot be evaluated "
                               "on RL tasks")
        check_rl_config(method)
        return adapted_returns(method, episode).float()

    def __repr__(self) -> str:
        return f"RLTasks({self.env!r}, {self.shots} inner / {self.queries} outer rollouts, batch {self.batch})"
