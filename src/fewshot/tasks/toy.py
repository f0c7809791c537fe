"""Toy binary classification tasks in the spirit of the NumPy MAML demonstrations.

Inputs ``x ~ U[0, 1]^dim``; each task has its own linear boundary through the centre of the cube,
``label = [(x - 0.5) . w > 0]`` with ``w = mu + spread * noise``: ``mu`` is one direction shared by the whole
family (what meta-learning can discover), the noise makes every task different. The natural model is
logistic regression (an MLP with no hidden layer). Each class gets exactly ``shots + queries`` points:
a point drawn on the wrong side is reflected through the centre (``x -> 1 - x``), which flips its label.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..episodes import Episode
from ..errors import FewshotError
from .base import TaskFamily


class BinaryTasks(TaskFamily):
    name = "toy-binary"
    regression = False
    outputs = 2

    def __init__(self, shots: int = 5, queries: int = 15, batch: int = 10, device="cpu", seed: int = 0,
                 ways: Optional[int] = 2, dim: int = 50, spread: float = 0.5, family_seed: int = 1234):
        super().__init__(shots, queries, batch, device, seed)
        if ways not in (None, 2):
            raise FewshotError(f"toy-binary tasks are 2-way, got --ways {ways}")
        self.ways, self.dim, self.spread = 2, int(dim), float(spread)
        self.in_shape = (self.dim,)
        g = torch.Generator().manual_seed(family_seed)
        mu = torch.randn(self.dim, generator=g)
        self.mu = (mu / mu.norm()).to(self.device)

    def sample(self, batch: Optional[int] = None) -> Episode:
        B, K, Q = batch or self.batch, self.shots, self.queries
        w = self.mu + self.spread * torch.randn(B, self.dim, generator=self.generator,
                                                device=self.device) / self.dim ** 0.5
        M = K + Q
        x = self._rand(B, 2, M, self.dim)                        # class-major: [B, class, point, dim]
        side = ((x - 0.5) @ w.view(B, 1, self.dim, 1)).squeeze(-1) > 0     # [B, 2, M]
        want = torch.tensor([False, True], device=self.device).view(1, 2, 1)
        x = torch.where((side != want).unsqueeze(-1), 1 - x, x)
        y = torch.arange(2, device=self.device).view(1, 2, 1).expand(B, 2, M)
        sx, qx = x[:, :, :K].reshape(B, 2 * K, self.dim), x[:, :, K:].reshape(B, 2 * Q, self.dim)
        sy, qy = y[:, :, :K].reshape(B, 2 * K), y[:, :, K:].reshape(B, 2 * Q)
        return Episode(sx, sy, qx, qy, 2, K, Q, extra={"w": w})

    def __repr__(self) -> str:
        return f"BinaryTasks({self.dim}-d, {self.shots}-shot {self.queries}-query, batch {self.batch})"
