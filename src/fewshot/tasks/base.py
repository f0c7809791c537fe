"""Shared plumbing of task-family samplers (seeded generator, state for exact resume)."""
from __future__ import annotations

import abc
from typing import Iterator, Optional

import torch

from ..episodes import Episode
from ..errors import FewshotError


class TaskFamily(abc.ABC):
    """Base class: subclasses set ``in_shape``, ``outputs``, ``regression`` and implement ``sample``."""

    name = ""
    regression = False
    in_shape: tuple = ()
    outputs = 1
    #: whether the family's tasks come from a data set split into parts (``--data strokes:PATH``): then
    #: :func:`fewshot.tasks.make` passes ``split`` ("train", "val" or "test") and the family draws the
    #: training, validation and test tasks from disjoint parts; families of random task parameters
    #: (sine, navigation) hold tasks apart by their seeds alone
    data_split = False

    def __init__(self, shots: int, queries: int, batch: int = 1, device="cpu", seed: int = 0):
        for k, v in (("shots", shots), ("batch", batch)):
            if int(v) < 1:
                raise FewshotError(f"{k} must be at least 1, got {v}")
        if int(queries) < 1:
            raise FewshotError(f"queries must be at least 1, got {queries}")
        self.shots, self.queries, self.batch = int(shots), int(queries), int(batch)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.device)

    @abc.abstractmethod
    def sample(self, batch: Optional[int] = None) -> Episode:
        """A batch of ``batch`` (default ``self.batch``) tasks as an :class:`Episode`."""

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()


class EnvTaskFamily(TaskFamily):
    """A family whose tasks are parameters of an environment (:class:`fewshot.rl.envs.TaskSource`), named by
    a ``--data`` spec such as ``navigation2d`` or ``bandit:k=5,n=100``; episodes carry the parameters as
    ``extra["task:NAME"]`` tensors. Subclasses say how a batch is drawn (``sample``) and scored
    (``evaluate_episode``)."""

    regression = False
    higher_is_better = True

    def __init__(self, shots: int, queries: int, batch: int = 1, device="cpu", seed: int = 0,
                 ways: Optional[int] = None, env: str = ""):
        super().__init__(shots, queries, batch, device, seed)
        if ways not in (None, 0):
            raise FewshotError(f"{self.name} task families have no ways; got --ways {ways}")
        from ..rl.envs import make_source
        self.ways = 0
        self.spec = env
        self.env = make_source(env)
        self.in_shape = (self.env.obs_dim,)

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "EnvTaskFamily":
        return cls(env=spec, **kw)

    @staticmethod
    def task_params(episode: Episode) -> dict:
        """The task parameters an episode carries (``extra["task:NAME"]`` -> ``{NAME: tensor}``)."""
        return {k[5:]: v for k, v in episode.extra.items() if k.startswith("task:")}
