"""Networks for gradient-based meta-learning, written to be called functionally.

``forward(x, step=0, context=None, twice=False)`` returns ``(output, stats)``; the inner loop calls it
through ``torch.func.functional_call`` with adapted parameters (``twice`` for a pass it will differentiate
twice: second-order support passes). Nothing in a forward pass mutates the module, so
the same call runs inside ``torch.func.grad`` and ``torch.func.vmap``.

Batch norm is an explicit mode (``bn``):

- ``"transductive"``: always normalise with the statistics of the batch at hand (the support set in the
  inner loop, the whole query set of a task at the end) -- what the original MAML does, at training and at
  test time. Queries of one task share statistics; tasks never do.
- ``"running"``: per-inner-step running statistics (as in MAML++): training normalises with batch
  statistics and returns them in ``stats`` so the caller can update the running averages *outside* the
  functional transforms; evaluation normalises with the running statistics of that step, so each query is
  classified on its own (inductive).
- ``"none"``: no normalisation layers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from . import channels_last_input, norm_pool, norm_pool_applies

BN_MODES = ("transductive", "running", "none")
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


def batch_norm_twice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch norm with batch statistics, in plain differentiable operations (fp32 inside for bf16/fp16
    inputs, output in the input's dtype): the same values as ``F.batch_norm(x, None, None, weight, bias,
    True, 0, eps)`` up to rounding.

    The fused kernel's second derivative (``batchnorm_double_backward``) reduces over the batch axis on its
    own before the spatial axes, which on a channels-last tensor is about 15x slower than one reduction over
    all of them; written out, every reduction here is a single one over ``(0, 2, 3, ...)``. Measured on the
    support pass of second-order MAML on Omniglot: about 20 % off the whole inner loop and its second
    derivative, and about 10 % off a training step.
    """
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    xc = xf - xf.sum(dims, keepdim=True) / n
    var = (xc * xc).sum(dims, keepdim=True) / n
    y = xc * (torch.rsqrt(var + eps) * weight.to(xf.dtype).view(shape)) + bias.to(xf.dtype).view(shape)
    return y.to(x.dtype)


class MetaNorm(nn.Module):
    """Batch norm with an explicit mode; ``running`` keeps one set of statistics per inner step."""

    def __init__(self, channels: int, mode: str, steps: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.mode, self.momentum, self.eps = mode, momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if mode == "running":
            self.register_buffer("running_mean", torch.zeros(steps + 1, channels))
            self.register_buffer("running_var", torch.ones(steps + 1, channels))

    def forward(self, x: torch.Tensor, step: int, stats: list, twice: bool = False) -> torch.Tensor:
        """Normalise ``x`` (``[N, C, ...]``) per channel. ``twice``: this pass will be differentiated twice
        (the support pass of a second-order inner loop); batch statistics are then computed with plain
        tensor operations (see :func:`batch_norm_twice`), whose second derivative is far cheaper than the
        fused kernel's."""
        w, b = self.weight, self.bias
        if self.mode == "running" and not self.training:
            s = min(step, self.running_mean.shape[0] - 1)
            return F.batch_norm(x, self.running_mean[s], self.running_var[s], w, b, False, 0.0, self.eps)
        if self.mode == "running":
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=1)
            stats.append((mean, var))
        if twice:
            return batch_norm_twice(x, w, b, self.eps)
        if x.dtype != w.dtype:
            # autocast hands bf16 activations to fp32 affine weights; mixed dtypes have no vmap batching
            # rule, so normalise in the activations' dtype (statistics are still accumulated in fp32)
            w, b = w.to(x.dtype), b.to(x.dtype)
        return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)

    def pooled(self, x: torch.Tensor, step: int, stats: list, twice: bool = False) -> torch.Tensor:
        """``F.max_pool2d(self(x, step, stats, twice), 2)``; with batch statistics on fp32/fp64 inputs computed
        pool-first by :func:`fewshot.models.norm_pool` (same values and gradients, fewer full-resolution
        passes), except on a pass that will be differentiated twice."""
        if twice or (self.mode == "running" and not self.training) or not norm_pool_applies(x, self.weight):
            return F.max_pool2d(self(x, step, stats, twice), 2)
        n = x.numel() // x.shape[1]
        y, mean, var = norm_pool(x, self.weight, self.bias, self.eps)
        if self.mode == "running":
            stats.append((mean.float(), (var * (n / max(n - 1, 1))).float()))
        return y

    def update(self, step: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Fold batch statistics of ``step`` into the running averages (called outside transforms)."""
        s = min(step, self.running_mean.shape[0] - 1)
        self.running_mean[s].lerp_(mean.to(self.running_mean.dtype), self.momentum)
        self.running_var[s].lerp_(var.to(self.running_var.dtype), self.momentum)


class MetaConv4(nn.Module):
    """Conv-4 (4 x [conv 3x3, batch norm, ReLU, max-pool 2], ``hidden`` channels) and a linear head.

    ``context`` > 0 adds CAVIA context parameters: a vector fed through a FiLM layer that scales and
    shifts the last block's channels.
    """

    def __init__(self, in_shape: Sequence[int], hidden: int = 64, outputs: int = 5, bn: str = "transductive",
                 steps: int = 1, context: int = 0, layers: int = 4):
        super().__init__()
        if bn not in BN_MODES:
            raise FewshotError(f"unknown batch-norm mode {bn!r}; choose from {', '.join(BN_MODES)}")
        c, h, w = (int(s) for s in in_shape)
        if min(h, w) < 2 ** layers:
            raise FewshotError(f"conv4 needs images of at least {2 ** layers}x{2 ** layers} pixels, got {h}x{w}")
        chans = [c] + [hidden] * layers
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(MetaNorm(hidden, bn, steps) for _ in range(layers)) if bn != "none" else None
        for _ in range(layers):
            h, w = h // 2, w // 2
        self.features = hidden * h * w
        self.context = context
        if context:
            # random weights, zero bias: the context starts at 0, so FiLM starts as the identity; a zero weight
            # would make the context's gradient (and so its adaptation) vanish for ever
            self.film = nn.Linear(context, 2 * hidden)
            nn.init.zeros_(self.film.bias)
        self.head = nn.Linear(self.features, outputs)
        self.channels_last = False

    def forward(self, x: torch.Tensor, step: int = 0, context: Optional[torch.Tensor] = None,
                twice: bool = False):
        stats: List = []
        if self.channels_last:
            # channels-last in, channels-last out, whatever the layout of the (adapted) weights
            x = channels_last_input(x)
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            x = conv(x)
            # max-pool before ReLU: identical to ReLU then pool (max commutes with a monotone map)
            if self.norms is not None and (context is None or i != last):
                x = F.relu(self.norms[i].pooled(x, step, stats, twice))
                continue
            if self.norms is not None:
                x = self.norms[i](x, step, stats, twice)
            if context is not None and i == last:
                gamma, beta = self.film(context).to(x.dtype).chunk(2, -1)
                x = x * (1 + gamma.view(1, -1, 1, 1)) + beta.view(1, -1, 1, 1)
            x = F.relu(F.max_pool2d(x, 2))
        return self.head(x.flatten(1)), stats

    def norm_layers(self) -> list:
        return list(self.norms) if self.norms is not None else []


class MetaMLP(nn.Module):
    """Linear -> activation (-> batch norm) per hidden size, then a linear head; inputs are flattened.

    ``context`` > 0 concatenates CAVIA context parameters to the input (as in CAVIA's regression nets).
    ``hidden=[]`` is a linear (logistic-regression) model.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (40, 40), outputs: int = 1, bn: str = "none",
                 steps: int = 1, context: int = 0, activation: str = "relu"):
        super().__init__()
        if bn not in BN_MODES:
            raise FewshotError(f"unknown batch-norm mode {bn!r}; choose from {', '.join(BN_MODES)}")
        if activation not in ACTIVATIONS:
            raise FewshotError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.context = context
        dims = [in_dim + context] + [int(h) for h in hidden]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(MetaNorm(o, bn, steps) for o in dims[1:]) if bn != "none" else None
        self.features = dims[-1]
        self.head = nn.Linear(dims[-1], outputs)
        self.channels_last = False

    def forward(self, x: torch.Tensor, step: int = 0, context: Optional[torch.Tensor] = None,
                twice: bool = False):
        stats: List = []
        x = x.flatten(1)
        if context is not None:
            x = torch.cat([x, context.to(x.dtype).expand(x.shape[0], -1)], 1)
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            x = act(layer(x))
            if self.norms is not None:
                x = self.norms[i](x, step, stats, twice)
        return self.head(x), stats

    def norm_layers(self) -> list:
        return list(self.norms) if self.norms is not None else []


def meta_network(kind: str, in_shape: Sequence[int], outputs: int, hidden: int = 64,
                 mlp_hidden: Sequence[int] = (40, 40), bn: str = "transductive", steps: int = 1,
                 context: int = 0, activation: str = "relu") -> nn.Module:
    """A functional-friendly network for ``in_shape``: ``conv4`` for images, ``mlp`` for vectors."""
    if kind == "auto":
        kind = "conv4" if len(in_shape) == 3 else "mlp"
    if kind == "conv4":
        if len(in_shape) != 3:
            raise FewshotError(f"conv4 needs image inputs (C, H, W), got shape {tuple(in_shape)}")
        return MetaConv4(in_shape, hidden, outputs, bn, steps, context)
    if kind == "mlp":
        return MetaMLP(int(torch.Size(in_shape).numel()), mlp_hidden, outputs, bn, steps, context, activation)
    raise FewshotError(f"unknown backbone {kind!r}; choose conv4, mlp or auto")


def head_inputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features ``net`` (a :func:`meta_network`) hands its linear head for ``x``: the embedding the
    plots draw."""
    feats = {}
    handle = net.head.register_forward_hook(lambda m, inp, out: feats.setdefault("z", inp[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return feats["z"]
