"""Any ``nn.Module`` as a gradient-based meta-learner's network.

:class:`FunctionalNet` wraps a whole network (head included, as in learn2learn) behind the interface of
:mod:`fewshot.models.meta` -- ``forward(x, step=0, context=None, twice=False) -> (output, stats)``,
``head``, ``norm_layers()`` -- so the inner loop of :mod:`fewshot.methods.gbml` runs on it through
``torch.func.functional_call`` exactly as on ``MetaConv4``/``MetaMLP``. Nothing in a forward pass mutates the
module (what ``torch.func.grad`` and ``vmap`` require), which fixes how its batch-norm layers
(``nn.BatchNorm1d/2d/3d`` and subclasses) behave, by the explicit mode ``bn``:

- ``"transductive"``: every batch-norm layer always normalises with the statistics of the batch at hand
  (the support set in the inner loop, a task's whole query set at the end), in training and evaluation;
  the layers' own running averages are neither used nor updated (they stay in the state_dict, so a
  pretrained file loads as it is).
- ``"running"``: one set of running statistics per inner step and layer (buffers ``step_mean{i}``,
  ``step_var{i}``, as in MAML++): training normalises with batch statistics and returns them in ``stats``
  for the caller to fold into the averages outside the transforms; evaluation normalises each query with
  the statistics of its step (inductive).
- ``"none"``: for networks without batch-norm layers; a module that has some is refused (remove them, or
  choose one of the other modes).

CAVIA's context (``context`` > 0) enters as a FiLM layer on the features the head receives: the head's
input ``z`` becomes ``z * (1 + gamma) + beta`` with ``(gamma, beta) = film(context)``, the identity at the
zero context every task starts from.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..errors import FewshotError
from .backbones import feature_dim, find_head

_NORMS = nn.modules.batchnorm._BatchNorm


def _affine_dtype(mod: nn.Module, inputs):
    """Batch norm on autocast's bf16 activations with fp32 affine weights: in the weights' dtype (mixed
    dtypes have no ``vmap`` batching rule); the next autocast layer casts back."""
    x = inputs[0]
    w = mod.weight
    if w is not None and x.dtype != w.dtype and x.is_floating_point():
        return (x.to(w.dtype),) + tuple(inputs[1:])
    return None


class _StepStats:
    """One batch-norm layer's per-step running statistics, updated as :class:`~fewshot.models.meta.MetaNorm`
    updates its own (``update(step, mean, var)``, outside the functional transforms)."""

    def __init__(self, net: "FunctionalNet", i: int, momentum: Optional[float]):
        self.net, self.i = net, i
        self.momentum = 0.1 if momentum is None else float(momentum)

    def update(self, step: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        rm, rv = getattr(self.net, f"step_mean{self.i}"), getattr(self.net, f"step_var{self.i}")
        s = min(step, rm.shape[0] - 1)
        rm[s].lerp_(mean.to(rm.dtype), self.momentum)
        rv[s].lerp_(var.to(rv.dtype), self.momentum)


class FunctionalNet(nn.Module):
    """``module`` (a whole network: inputs to ``outputs`` values) for the gradient-based inner loop.

    ``head``: the name of the classifier head (what ANIL adapts and BOIL keeps fixed): the given name, else
    the head the module declares, else its last ``nn.Linear`` (:func:`~fewshot.models.backbones.find_head`).
    ``bn``, ``steps`` (inner steps with statistics of their own) and ``context`` as in the module docstring.
    Its parameters are the module's under ``body.`` (and ``film.`` for the context)."""

    def __init__(self, module: nn.Module, in_shape: Sequence[int], bn: str = "transductive", steps: int = 1,
                 context: int = 0, head: Optional[str] = None, name: str = ""):
        super().__init__()
        self._stats: Optional[dict] = None          # set during a forward pass only
        self._ctx: Optional[torch.Tensor] = None
        self.body = module
        self.bn = bn
        self.label = name or type(module).__name__
        self.head_path = find_head(module, head or None)
        norms = [(n, m) for n, m in module.named_modules() if isinstance(m, _NORMS)]
        if bn == "none" and norms:
            raise FewshotError(f"backbone {self.label} has batch-norm layers ({', '.join(n for n, _ in norms[:3])}"
                               f"{', ...' if len(norms) > 3 else ''}); --bn none is for networks without them: "
                               f"choose --bn transductive or running")
        self._norm_names = [n for n, _ in norms]
        self._norms: List = []
        for i, (n, m) in enumerate(norms):
            # batch statistics in training, no in-place updates of the module's own averages
            m.track_running_stats = False
            m.register_forward_pre_hook(_affine_dtype)
            if bn == "running":
                if m.running_mean is None:
                    raise FewshotError(f"backbone {self.label}: batch-norm layer {n} keeps no running "
                                       f"statistics buffers; --bn running needs them (or use transductive)")
                c = m.running_mean.shape[0]
                self.register_buffer(f"step_mean{i}", torch.zeros(steps + 1, c))
                self.register_buffer(f"step_var{i}", torch.ones(steps + 1, c))
                self._norms.append(_StepStats(self, i, m.momentum))
                m.register_forward_pre_hook(functools.partial(self._record, i))
        self.context = int(context)
        if self.context:
            if self.head_path is None:
                raise FewshotError(f"backbone {self.label} has no nn.Linear head for CAVIA's context to enter "
                                   f"(the context scales and shifts the head's input); name one with --head")
            dim = feature_dim(module, in_shape, self.head_path)
            # random weights, zero bias: FiLM starts as the identity at the zero context, and the context's
            # gradient does not vanish
            self.film = nn.Linear(self.context, 2 * dim)
            nn.init.zeros_(self.film.bias)
            module.get_submodule(self.head_path).register_forward_pre_hook(self._film)
        self.channels_last = False
        self.train(self.training)

    @property
    def head(self) -> nn.Module:
        """The classifier head submodule (its input is what :func:`fewshot.models.meta.head_inputs` returns)."""
        if self.head_path is None:
            raise FewshotError(f"backbone {self.label} has no nn.Linear head; name one with --head")
        return self.body.get_submodule(self.head_path)

    @property
    def head_prefix(self) -> Optional[str]:
        """The parameter-name prefix of the head in this wrapper (``body.fc.``), ``None`` without a head."""
        return None if self.head_path is None else f"body.{self.head_path}."

    def train(self, mode: bool = True) -> "FunctionalNet":
        super().train(mode)
        if self.bn == "transductive":      # batch statistics at evaluation too
            for n in self._norm_names:
                self.body.get_submodule(n).training = True
        return self

    def _record(self, i: int, mod: nn.Module, inputs) -> None:
        if self._stats is not None:
            x = inputs[0].detach()
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x.float(), dim=dims, correction=1)
            self._stats[i] = (mean, var)

    def _film(self, mod: nn.Module, inputs):
        if self._ctx is None:
            return None
        z = inputs[0]
        gamma, beta = self.film(self._ctx).to(z.dtype).chunk(2, -1)
        return (z * (1 + gamma) + beta,) + tuple(inputs[1:])

    def forward(self, x: torch.Tensor, step: int = 0, context: Optional[torch.Tensor] = None,
                twice: bool = False):
        """``(module(x), stats)``; ``stats``: each batch-norm layer's batch ``(mean, var)`` in training with
        ``bn="running"`` (empty otherwise). ``twice`` is accepted for the interface and changes nothing."""
        recording = self.bn == "running" and self.training
        running_eval = self.bn == "running" and not self.training and bool(self._norm_names)
        seen: dict = {}
        self._stats = seen if recording else None
        self._ctx = context
        try:
            if running_eval:
                s = step
                over = {}
                for i, n in enumerate(self._norm_names):
                    rm = getattr(self, f"step_mean{i}")
                    s = min(step, rm.shape[0] - 1)
                    over[f"{n}.running_mean"] = rm[s]
                    over[f"{n}.running_var"] = getattr(self, f"step_var{i}")[s]
                out = functional_call(self.body, over, (x,), strict=False)
            else:
                out = self.body(x)
        finally:
            self._stats, self._ctx = None, None
        stats: list = []
        if recording:
            # one (mean, var) per layer in module order; a layer this pass did not reach keeps its averages
            for i in range(len(self._norm_names)):
                s = min(step, getattr(self, f"step_mean{i}").shape[0] - 1)
                stats.append(seen.get(i) or (getattr(self, f"step_mean{i}")[s], getattr(self, f"step_var{i}")[s]))
        return out, stats

    def norm_layers(self) -> list:
        """Objects with ``update(step, mean, var)`` for the running mode, one per batch-norm layer in the
        order their statistics appear in ``stats``."""
        return list(self._norms)
