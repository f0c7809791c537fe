"""Sine regression (Finn et al. 2017): y = A sin(x - phase), A ~ U(0.1, 5), phase ~ U(0, pi), x ~ U(-5, 5)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..episodes import Episode
from ..errors import FewshotError
from .base import TaskFamily


class SineTasks(TaskFamily):
    """Batches of sine-regression tasks: ``shots`` support points and ``queries`` query points each.

    Episodes hold ``x`` ``[B, K, 1]`` and float targets ``y`` ``[B, K, 1]``; ``extra`` carries each task's
    amplitude and phase (for plots). Held-out tasks are simply tasks drawn with another seed.
    """

    name = "sine"
    regression = True
    in_shape = (1,)
    outputs = 1

    def __init__(self, shots: int = 10, queries: int = 10, batch: int = 25, device="cpu", seed: int = 0,
                 ways: Optional[int] = None, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        super().__init__(shots, queries, batch, device, seed)
        self.ways = 0
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        if self.amplitude[0] > self.amplitude[1] or self.x_range[0] >= self.x_range[1]:
            raise FewshotError("sine ranges must be (low, high) with low < high")

    @staticmethod
    def curve(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """``A sin(x - phase)`` for ``x`` ``[B, M, 1]`` and per-task ``A``, ``phase`` ``[B]``."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def sample(self, batch: Optional[int] = None) -> Episode:
        B = batch or self.batch
        lo, hi = self.amplitude
        amp = lo + (hi - lo) * self._rand(B)
        ph = self.phase[0] + (self.phase[1] - self.phase[0]) * self._rand(B)
        x0, x1 = self.x_range
        x = x0 + (x1 - x0) * self._rand(B, self.shots + self.queries, 1)
        y = self.curve(x, amp, ph)
        K = self.shots
        return Episode(x[:, :K], y[:, :K], x[:, K:], y[:, K:], 0, self.shots, self.queries,
                       extra={"amplitude": amp, "phase": ph})

    def __repr__(self) -> str:
        return f"SineTasks({self.shots}-shot {self.queries}-query, batch {self.batch}, seed {self.seed})"
