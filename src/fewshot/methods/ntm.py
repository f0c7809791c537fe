"""Neural Turing machine (Graves, Wayne & Danihelka 2014, arXiv:1410.5401) and its LSTM baseline, as sequence
methods for the copy task (``--data copy``, :mod:`fewshot.tasks.copy`).

Both map an input sequence ``[B, T, D]`` to logits ``[B, T, outputs]`` (one output vector per step). Targets
``[B, L, outputs]`` are aligned with the last L steps (the copy task's answer period); the loss is the binary
cross-entropy of those steps,

    loss = - 1 / (B L outputs) sum_{b, t, j} [y log sigma(o) + (1 - y) log(1 - sigma(o))],

and the reported score is bits wrong per sequence (sigma(o) rounded against y, summed over the copy). The
paper's recipe: RMSprop with momentum 0.9, learning rate 1e-4, gradient components clipped to [-10, 10];
an LSTM controller of 100 units, memory 128 x 20, one read and one write head (about 66k parameters).
The baseline is a stacked LSTM (3 layers like the paper's) whose width, 56 by default, gives about the same
number of parameters as the default NTM (the paper's baseline, 3 x 256 units and 1.35M parameters, is
``--hidden 256``).

The memory and every recurrence run in fp32 even under bf16 autocast: addressing and memory updates
compound over time and these models are small.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import FewshotError
from ..models.memory import NTMCell, count_parameters
from ..tasks.copy import bits_wrong, copy_bce
from . import register
from .base import Method

#: the paper's optimisation recipe for both models on the copy task
COPY_RUN_DEFAULTS = {
    "data": "copy", "batch": 16, "shots": 1, "queries": 1, "val_shots": 1, "val_queries": 1,
    "test_shots": 1, "test_queries": 1, "test_episodes": 1000,
    "train": {"optimizer": "rmsprop", "lr": 1e-4, "momentum": 0.9, "grad_clip_value": 10.0,
              "schedule": "none", "episodes": 20000, "val_every": 1000, "val_episodes": 200,
              "ckpt_every": 1000},
}


class SequenceMethod(Method):
    """Shared plumbing: inputs are sequences ``[B, T, D]``; the support set is unused (the copy task has
    nothing to adapt to, so ``predict`` reads ``query_x`` only)."""

    run_defaults: ClassVar[dict] = COPY_RUN_DEFAULTS
    labels_sequences: ClassVar[bool] = True

    def __init__(self, config, in_shape):
        super().__init__(config, in_shape)
        if len(self.in_shape) != 1:
            raise FewshotError(f"{self.name} reads sequences of vectors (e.g. --data copy), got inputs of shape "
                               f"{self.in_shape}")
        if int(config.outputs) < 1:
            raise FewshotError(f"outputs must be at least 1, got {config.outputs}")

    @abc.abstractmethod
    def run_sequence(self, x: torch.Tensor, record: bool = False) -> tuple:
        """Logits ``[B, T, outputs]`` for fp32 inputs ``[B, T, D]`` and a trace dict (for the NTM with
        ``record``: ``read_weights`` ``[B, T, R, N]`` and ``write_weights`` ``[B, T, Hw, N]``)."""

    def sequence_logits(self, x: torch.Tensor, record: bool = False) -> tuple:
        if x.dim() != 3 or x.shape[-1] != self.in_shape[0]:
            raise FewshotError(f"{self.name} expects sequences [B, T, {self.in_shape[0]}], got {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            return self.run_sequence(x.float(), record)

    def predict(self, support_x, support_y, query_x, ways=None):
        return self.sequence_logits(query_x)[0]

    def loss(self, episode):
        logits = self.predict(episode.support_x, episode.support_y, episode.query_x)
        loss = copy_bce(logits, episode.query_y)
        bits = bits_wrong(logits.detach(), episode.query_y).mean()
        return loss, {"bce": float(loss.detach()), "bits": float(bits)}

    def parameter_count(self) -> int:
        return count_parameters(self)


@register("ntm")
class NTM(SequenceMethod):
    """Neural Turing machine: LSTM controller with an N x W memory and content/location addressing (Graves et al. 2014)."""

    @dataclass
    class Config:
        controller: int = 100       #: LSTM controller units
        memory_size: int = 128      #: N, memory slots
        memory_width: int = 20      #: W, width of a slot
        read_heads: int = 1         #: read heads (each reads one weighted sum of slots)
        write_heads: int = 1        #: write heads (each erases, then adds)
        shift_range: int = 1        #: allowed shifts -R..R of the location addressing (1: {-1, 0, +1})
        outputs: int = 8            #: output vector size (filled from the task: 8 bits for copy)

    def __init__(self, config: "NTM.Config", in_shape):
        super().__init__(config, in_shape)
        self.cell = NTMCell(self.in_shape[0], config.outputs, controller=config.controller,
                            memory_size=config.memory_size, memory_width=config.memory_width,
                            read_heads=config.read_heads, write_heads=config.write_heads,
                            shift_range=config.shift_range)

    def run_sequence(self, x, record=False):
        return self.cell.run(x, record=record)


@register("lstm")
class LSTMBaseline(SequenceMethod):
    """Stacked LSTM baseline for the copy task (width matched to the NTM's parameter count)."""

    @dataclass
    class Config:
        hidden: int = 56            #: units per layer (56: about the default NTM's 66k parameters)
        layers: int = 3             #: stacked LSTM layers
        outputs: int = 8            #: output vector size (filled from the task: 8 bits for copy)

    def __init__(self, config: "LSTMBaseline.Config", in_shape):
        super().__init__(config, in_shape)
        if config.hidden < 1 or config.layers < 1:
            raise FewshotError(f"lstm needs hidden >= 1 and layers >= 1, got {config.hidden} and {config.layers}")
        self.lstm = nn.LSTM(self.in_shape[0], config.hidden, config.layers, batch_first=True)
        self.output = nn.Linear(config.hidden, config.outputs)

    def run_sequence(self, x, record=False):
        h, _ = self.lstm(x)
        return self.output(h), {}
