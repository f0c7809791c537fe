"""Meta-imitation task families: ``--data reach`` (one-shot imitation of 2-D reaching, Finn et al. 2017b), and
``--data strokes:PATH`` (:class:`StrokeTasks`: one-shot imitation of human handwriting from Omniglot's pen
strokes).

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

import os
from pathlib import Path
from typing import Optional

import torch

from ..episodes import Episode
from ..errors import FewshotError
from ..rl.envs import rollout
from .base import EnvTaskFamily, TaskFamily


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


#: the last stroke set read by :meth:`StrokeTasks.from_spec` (reading the archives takes seconds)
_STROKES: dict = {}


class StrokeTasks(TaskFamily):
    """One-shot imitation of handwriting: each task is an Omniglot character, each demonstration one drawer's
    pen trajectory (:func:`fewshot.data.strokes.load_strokes`), a real human demonstration.

    The policy sees the pen position and the time ``[x_t, y_t, t / (T - 1)]`` and outputs the next move
    ``p_{t+1} - p_t``; the support set holds ``shots`` drawers' demonstrations of a character, the query set
    ``queries`` other drawers'. :meth:`evaluate_episode` draws the character in closed loop from the first
    support demonstration's starting point and scores the drawing by its mean time-aligned distance to every
    other drawer of that character (lower is better; :meth:`copy_baseline` scores the demonstration itself,
    the nearest-neighbour answer)."""

    name = "strokes"
    regression = True
    metric = "distance"
    metric_label = "mean distance to the other drawers"
    higher_is_better = False
    outputs = 2
    data_split = True
    #: the alphabets whose characters are the test tasks unless the spec says ``test=A+B`` (the Omniglot
    #: split of the other benchmarks); every tenth remaining character is a validation task
    TEST_ALPHABETS = ("Korean", "Tagalog")
    VAL_EVERY = 10

    def __init__(self, strokes, shots: int = 1, queries: int = 1, batch: int = 10, device="cpu", seed: int = 0,
                 ways: Optional[int] = None):
        super().__init__(shots, queries, batch, device, seed)
        self.ways, self.in_shape = 0, (3,)
        drawers = min(len(t) for t in strokes.trajectories)
        if drawers < shots + queries + 1:
            raise FewshotError(f"a character has {drawers} drawers; {shots} shots + {queries} queries + 1 "
                               "other drawer to score against are needed")
        self.drawers = drawers
        self.data = torch.stack([t[:drawers] for t in strokes.trajectories]).to(self.device)   # [C, D, T, 2]
        self.points = strokes.points

    @classmethod
    def from_spec(cls, spec: str, split: str = "train", **kw) -> "StrokeTasks":
        """``strokes[:PATH][,points=N][,test=A+B]``: the stroke archives (or their folders) under ``PATH``
        (default ``$FEWSHOT_DATA/omniglot``), trajectories of ``points`` positions (default 50); the
        characters of the ``test`` alphabets are the test tasks, every :attr:`VAL_EVERY`-th other character a
        validation task, the rest the training tasks (``split``)."""
        from ..data.strokes import load_strokes
        path, points, test = None, 50, cls.TEST_ALPHABETS
        for item in filter(None, spec.partition(":")[2].split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                path = item
            elif key == "points":
                try:
                    points = int(value)
                except ValueError:
                    raise FewshotError(f"--data {spec}: points must be an integer, got {value!r}") from None
            elif key == "test":
                test = tuple(filter(None, value.split("+")))
            else:
                raise FewshotError(f"--data {spec}: unknown option {key!r} (points, test)")
        if path is None:
            root = os.environ.get("FEWSHOT_DATA")
            if not root:
                raise FewshotError("--data strokes needs the folder of the stroke archives: --data strokes:PATH "
                                   "(or set $FEWSHOT_DATA to a folder holding omniglot/)")
            path = str(Path(root) / "omniglot")
        if split not in ("train", "val", "test"):
            raise FewshotError(f"unknown split {split!r} (train, val, test)")
        key = (str(Path(path).resolve()), int(points))
        if key not in _STROKES:
            _STROKES.clear()            # one stroke set at a time (train, val and test share it)
            _STROKES[key] = load_strokes(path, points=points)
        strokes = _STROKES[key]
        missing = [a for a in test if a not in set(strokes.groups)]
        if missing:
            raise FewshotError(f"--data {spec}: no alphabet {missing[0]!r} among the strokes of {path}")
        if split == "test":
            part = strokes.select(groups=test)
        else:
            rest = strokes.select(exclude=test)
            keep = [i for i in range(len(rest)) if (i % cls.VAL_EVERY == cls.VAL_EVERY - 1) == (split == "val")]
            part = type(rest)([rest.names[i] for i in keep], [rest.groups[i] for i in keep],
                              [rest.trajectories[i] for i in keep], rest.points)
        return cls(part, **kw)

    def _pairs(self, traj: torch.Tensor) -> tuple:
        """Demonstrations ``[B, n, T, 2]`` -> observations ``[B, n*(T-1), 3]`` and moves ``[B, n*(T-1), 2]``."""
        B, n, T, _ = traj.shape
        t = torch.linspace(0, 1, T, device=traj.device)[:-1].view(1, 1, T - 1, 1).expand(B, n, T - 1, 1)
        obs = torch.cat([traj[:, :, :-1], t], -1)
        return obs.reshape(B, n * (T - 1), 3), (traj[:, :, 1:] - traj[:, :, :-1]).reshape(B, n * (T - 1), 2)

    def sample(self, batch: Optional[int] = None) -> Episode:
        B, K, Q = batch or self.batch, self.shots, self.queries
        C = self.data.shape[0]
        chars = torch.randint(C, (B,), generator=self.generator, device=self.device)
        order = torch.rand(B, self.drawers, generator=self.generator, device=self.device).argsort(1)
        traj = self.data[chars.unsqueeze(1), order]                              # [B, D, T, 2]
        sx, sy = self._pairs(traj[:, :K])
        qx, qy = self._pairs(traj[:, K:K + Q])
        return Episode(sx, sy, qx, qy, 0, K, Q, classes=chars.unsqueeze(1),
                       extra={"start": traj[:, 0, 0], "others": traj[:, K:], "demo": traj[:, 0]})

    @torch.no_grad()
    def evaluate_episode(self, method, episode: Episode) -> torch.Tensor:
        """Mean distance ``[B]`` of the method's closed-loop drawing to the character's other drawers."""
        from ..data.strokes import trajectory_distance
        pos = episode.extra["start"].unsqueeze(1)                               # [B, 1, 2]
        T = self.points
        path = [pos]
        for t in range(T - 1):
            obs = torch.cat([pos, torch.full_like(pos[..., :1], t / (T - 1))], -1)
            pos = pos + method.predict(episode.support_x, episode.support_y, obs).float()
            path.append(pos)
        drawing = torch.cat(path, 1)                                              # [B, T, 2]
        return trajectory_distance(drawing.unsqueeze(1), episode.extra["others"]).mean(1)

    def copy_baseline(self, episode: Episode) -> torch.Tensor:
        """The same score for the first support demonstration itself (nearest neighbour: the only example)."""
        from ..data.strokes import trajectory_distance
        return trajectory_distance(episode.extra["demo"].unsqueeze(1), episode.extra["others"]).mean(1)
