"""The copy task of the neural Turing machine paper (Graves, Wayne & Danihelka 2014, section 4.1).

A sequence of L random binary vectors of width 8 (each bit 0 or 1 with probability 1/2) is presented one
vector per step, followed by a delimiter; then the model gets blank inputs for L steps and must reproduce
the sequence. Inputs have one extra channel that is 1 only at the delimiter step:

    step:     0 .. L-1            L              L+1 .. 2L
    input:    [bits_t, 0]        [0..0, 1]      [0..0, 0]
    target:   -                  -              bits_{t-L-1}

Training draws L uniformly from ``min_length..max_length`` (1..20 by default); one length per batch, so a
batch needs no padding (sequences of a batch have equal length; successive batches differ). Names:
``copy`` (lengths 1..20), ``copy:40`` (exactly 40), ``copy:1-20`` (a range).

An :class:`~fewshot.episodes.Episode` of B sequences holds the inputs as ``query_x`` ``[B, 2L+1, 9]`` and the
targets as ``query_y`` ``[B, L, 8]`` (float bits); the support tensors are empty (``[B, 0, 9]``, ``[B, 0, 8]``):
the copy task has nothing to adapt to. A model emits logits at every step, ``[B, 2L+1, 8]``; the last L are the
copy. The per-task metric is bits wrong per sequence (``metric = "bits"``, lower is better): the rounded
sigmoid outputs against the targets, summed over the copy.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F

from ..episodes import Episode
from ..errors import FewshotError
from .base import TaskFamily

DEFAULT_LENGTHS = (1, 20)


def parse_lengths(spec: str) -> tuple:
    """``"copy"`` -> (1, 20); ``"copy:40"`` -> (40, 40); ``"copy:1-20"`` -> (1, 20)."""
    name, _, rest = spec.partition(":")
    if name != "copy":
        raise FewshotError(f"not a copy-task name: {spec!r}")
    if not rest:
        return DEFAULT_LENGTHS
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", rest)
    if not m:
        raise FewshotError(f"bad copy-task lengths {spec!r}: use copy, copy:L or copy:LMIN-LMAX")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if lo < 1 or hi < lo:
        raise FewshotError(f"bad copy-task lengths {spec!r}: need 1 <= LMIN <= LMAX")
    return lo, hi


def copy_inputs(bits: torch.Tensor) -> torch.Tensor:
    """The input sequence for targets ``bits`` ``[B, L, width]``: the bits, a delimiter step, L blank steps ->
    ``[B, 2L+1, width+1]``."""
    B, L, width = bits.shape
    x = bits.new_zeros(B, 2 * L + 1, width + 1)
    x[:, :L, :width] = bits
    x[:, L, width] = 1
    return x


def bits_wrong(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bits wrong per sequence: logits ``[B, T, width]`` (the last L steps are the copy) against targets
    ``[B, L, width]`` -> ``[B]`` (a bit is 1 where the logit is > 0, i.e. sigmoid > 1/2)."""
    L = targets.shape[1]
    pred = (logits[:, logits.shape[1] - L:] > 0).to(targets.dtype)
    return (pred != targets).flatten(1).sum(1).float()


def copy_bce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of the copy steps (the last L of ``logits``), in fp32; ``reduction="none"``
    gives the mean per bit of each sequence ``[B]``."""
    L = targets.shape[1]
    out = logits[:, logits.shape[1] - L:].float()
    bce = F.binary_cross_entropy_with_logits(out, targets.float(), reduction="none")
    return bce.mean() if reduction == "mean" else bce.flatten(1).mean(1)


class CopyTasks(TaskFamily):
    """Batches of copy-task sequences (see the module docstring); ``shots``/``queries`` are not used."""

    name = "copy"
    regression = False
    metric = "bits"
    metric_label = "bits wrong per sequence"

    def __init__(self, shots: int = 1, queries: int = 1, batch: int = 16, device="cpu", seed: int = 0,
                 ways: Optional[int] = None, lengths: tuple = DEFAULT_LENGTHS, width: int = 8):
        super().__init__(shots, queries, batch, device, seed)
        self.ways = 0
        lo, hi = (int(v) for v in lengths)
        if lo < 1 or hi < lo:
            raise FewshotError(f"copy-task lengths must satisfy 1 <= min <= max, got {lo}..{hi}")
        if int(width) < 1:
            raise FewshotError(f"copy-task width must be at least 1, got {width}")
        self.min_length, self.max_length, self.width = lo, hi, int(width)
        self.in_shape = (self.width + 1,)
        self.outputs = self.width

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "CopyTasks":
        return cls(lengths=parse_lengths(spec), **kw)

    def sample(self, batch: Optional[int] = None, length: Optional[int] = None) -> Episode:
        B = batch or self.batch
        if length is None:
            span = self.max_length - self.min_length + 1
            length = self.min_length + int(torch.randint(span, (1,), generator=self.generator,
                                                         device=self.device))
        L = int(length)
        bits = (self._rand(B, L, self.width) < 0.5).float()
        x = copy_inputs(bits)
        empty_x, empty_y = x[:, :0], bits[:, :0]
        return Episode(empty_x, empty_y, x, bits, 0, self.shots, self.queries,
                       extra={"length": torch.full((B,), L, device=self.device)})

    def score(self, prediction: torch.Tensor, episode: Episode) -> torch.Tensor:
        """Per-sequence metric: bits wrong (lower is better)."""
        return bits_wrong(prediction.float(), episode.query_y)

    def task_loss(self, prediction: torch.Tensor, episode: Episode) -> torch.Tensor:
        """Per-sequence BCE (mean per bit), the loss column of evaluations."""
        return copy_bce(prediction, episode.query_y, reduction="none")

    def __repr__(self) -> str:
        lengths = str(self.min_length) if self.min_length == self.max_length else \
            f"{self.min_length}-{self.max_length}"
        return f"CopyTasks(width {self.width}, lengths {lengths}, batch {self.batch}, seed {self.seed})"
