"""A task-conditioned (contextual) network: the deterministic path of a conditional neural process
(Garnelo et al. 2018), and the demonstration-conditioned baseline of one-shot imitation.

Every support pair ``(x_i, y_i)`` is encoded by an MLP ``h``; the task representation is their mean
``r = mean_i h([x_i, y_i])`` (order-free, any support size); a decoder MLP ``g`` maps ``[x, r]`` to the
output for a query ``x``. Nothing adapts at test time: the task enters through ``r`` alone. Targets are
float vectors (regression, actions of a demonstration: loss ``mse`` or ``bc``) or class labels (one-hot
inputs to ``h``, cross-entropy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from . import register
from .base import Method, accuracy
from .gbml import LOSSES, task_loss


def _mlp(sizes: List[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@dataclass
class ContextualConfig:
    hidden: List[int] = field(default_factory=lambda: [64, 64])   #: encoder and decoder hidden sizes
    context: int = 64               #: size of the task representation r
    outputs: int = 0                #: output size: target/action size, or ways (0: the run's)
    loss: str = "auto"              #: auto (ce for labels, mse for targets) | mse | bc | ce


@register("contextual")
class Contextual(Method):
    """Task-conditioned network (CNP-style): decoder([x, mean encoder([x_i, y_i])]); the contextual baseline."""

    Config = ContextualConfig

    def __init__(self, config, in_shape):
        super().__init__(config, in_shape)
        if config.outputs < 1:
            raise FewshotError("outputs (the target size, or the number of ways) must be set")
        if config.loss not in LOSSES or config.loss.startswith("pg"):
            raise FewshotError(f"unknown loss {config.loss!r} for contextual; choose auto, ce, mse or bc")
        d_in = int(torch.Size(self.in_shape).numel())
        hidden = [int(h) for h in config.hidden]
        self.encoder = _mlp([d_in + config.outputs, *hidden, config.context])
        self.decoder = _mlp([d_in + config.context, *hidden, config.outputs])

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        if torch.is_floating_point(y):
            return y.reshape(*y.shape[:2], -1)
        return F.one_hot(y.long(), self.config.outputs).float()

    def predict(self, support_x, support_y, query_x, ways=None):
        B = support_x.shape[0]
        sx = support_x.reshape(B, support_x.shape[1], -1).float()
        r = self.encoder(torch.cat([sx, self._targets(support_y)], -1)).mean(1, keepdim=True)
        qx = query_x.reshape(B, query_x.shape[1], -1).float()
        out = self.decoder(torch.cat([qx, r.expand(B, qx.shape[1], r.shape[-1])], -1))
        return out if ways is None or torch.is_floating_point(support_y) else out[..., :ways]

    def loss(self, episode):
        out = self.predict(episode.support_x, episode.support_y, episode.query_x)
        kind = self.config.loss
        losses = torch.stack([task_loss(o, y, kind) for o, y in zip(out, episode.query_y)])
        if torch.is_floating_point(episode.query_y):
            mse = (out.detach().float() - episode.query_y.float().view_as(out)).pow(2).mean()
            return losses.mean(), {"mse": float(mse)}
        return losses.mean(), {"acc": float(accuracy(out.detach(), episode.query_y).mean())}
