"""The contract every method follows.

A method is an ``nn.Module`` with

- ``loss(episode) -> (loss, metrics)``: the training objective on a batch of tasks (metrics: floats),
- ``predict(support_x, support_y, query_x, ways) -> logits`` ``[B, N*Q, ways]`` for inference,

and a dataclass ``Config`` of its options (defaults reproduce the literature recipe). The trainer,
the evaluator, the CLI and ``predict`` never ask which method they hold.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, fields
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..episodes import Episode
from ..errors import FewshotError


class Method(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str] = ""
    Config: ClassVar[type]
    #: run settings the literature uses with this method (RunConfig fields; "train" holds TrainConfig
    #: fields); ``fewshot train METHOD`` starts from them when no --config recipe is given
    run_defaults: ClassVar[dict] = {}

    def __init__(self, config, in_shape: Sequence[int]):
        super().__init__()
        self.config = config
        self.in_shape = tuple(int(s) for s in in_shape)

    # ---- the contract
    @abc.abstractmethod
    def loss(self, episode: Episode) -> tuple:
        """Training objective on a batch of tasks: ``(scalar loss, {name: float})``."""

    @abc.abstractmethod
    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                ways: int | None = None) -> torch.Tensor:
        """Logits ``[B, M, ways]`` for queries ``[B, M, ...]`` given a labelled support ``[B, S, ...]``."""

    # ---- optional
    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """Logits for the queries of an :class:`Episode` (what evaluation calls). Methods that use more
        of the episode than the labelled support (unlabelled examples, class attributes) override it."""
        return self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)

    def extra_plots(self, run, dataset, out_dir) -> list:
        """Method-specific figures for ``fewshot plot`` (paths written); none by default."""
        return []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images ``[M, C, H, W]`` (for plots); methods without an embedding may skip it."""
        raise FewshotError(f"method {self.name} has no embedding to plot")

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def option_fields(cls):
        return fields(cls.Config)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean accuracy per task: logits ``[B, M, N]``, labels ``[B, M]`` -> ``[B]``."""
    return (logits.argmax(-1) == y).float().mean(-1)


def infer_ways(support_y: torch.Tensor, ways: int | None) -> int:
    return int(ways) if ways is not None else int(support_y.max()) + 1
