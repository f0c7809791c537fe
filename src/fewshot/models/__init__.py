"""Backbones: Conv-4 for images, an MLP for vectors, 1-D convolutions over time for audio features."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _NormPool(torch.autograd.Function):
    """Batch norm with batch statistics, then a 2x2 max-pool: see :func:`norm_pool`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        # batch norm's own statistics kernel (one pass; several times faster than var_mean on channels-last)
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        negative = bool((scale < 0).any())
        sign = torch.where(scale < 0, -1.0, 1.0).to(x.dtype)
        # the affine map a * x + b is monotone per channel, so pooling commutes with it: pool sign * x
        m, idx = F.max_pool2d(x * sign.view(1, -1, 1, 1) if negative else x, 2, return_indices=True)
        out = m * scale.abs().view(1, -1, 1, 1) + (bias - mean * scale).view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight, m, idx, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz, _dmean, _dvar):
        x, weight, m, idx, mean, invstd = ctx.saved_tensors
        scale = weight * invstd
        sign = torch.where(scale < 0, -1.0, 1.0).to(x.dtype)
        n = x.numel() // x.shape[1]
        dbias = dz.sum((0, 2, 3))
        # out = |scale| * m + bias - mean * scale, with scale = weight * invstd and invstd = (var + eps)^-1/2
        dscale = sign * (dz * m).sum((0, 2, 3)) - mean * dbias
        dweight = dscale * invstd
        dvar = -0.5 * dscale * weight * invstd.pow(3)
        dmean = -scale * dbias
        # the statistics' part of dx, a * x + c per channel, then the pooled outputs' part at the argmaxes
        a = 2.0 * dvar / n
        c = dmean / n - a * mean
        dx = torch.addcmul(c.view(1, -1, 1, 1), x, a.view(1, -1, 1, 1))
        dpool = dz * scale.view(1, -1, 1, 1)
        _add_at_argmax(dx, idx, dpool)
        return dx, dweight, dbias, None


def _add_at_argmax(dx: torch.Tensor, idx: torch.Tensor, dpool: torch.Tensor) -> None:
    """``dx[n, c].view(-1)[idx[n, c]] += dpool[n, c]`` for max-pool indices ``idx`` (positions in each
    ``H x W`` plane), in place.

    On a channels-last ``dx`` a plane's elements lie ``C`` apart in memory, and ``scatter_add_`` along the
    plane is slow (1.8x the time of the flat sum below on a 60-way Omniglot episode's first feature map on an
    AMD EPYC); there the sum goes through one flat view of the memory instead, at offsets
    ``n * sN + c * sC + idx * sW`` (rows of ``W`` elements ``sW`` apart follow each other)."""
    N, C, H, W = dx.shape
    if dx.is_contiguous() or not dx.is_contiguous(memory_format=torch.channels_last):
        dx.view(N, C, H * W).scatter_add_(2, idx.flatten(2), dpool.flatten(2))
        return
    sn, sc, _, sw = dx.stride()
    base = (torch.arange(N, device=idx.device) * sn).view(N, 1, 1, 1) \
        + (torch.arange(C, device=idx.device) * sc).view(1, C, 1, 1)
    at = torch.addcmul(base, idx, torch.tensor(sw, device=idx.device))
    mem = dx.permute(0, 2, 3, 1).view(-1)                                   # dx's memory, in order
    mem.put_(at.permute(0, 2, 3, 1).reshape(-1), dpool.permute(0, 2, 3, 1).reshape(-1), accumulate=True)


def norm_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """``F.max_pool2d(F.batch_norm(x, None, None, weight, bias, True, 0, eps), 2)`` computed pool-first, and
    the batch statistics ``(mean, biased var)`` (no gradient) for running averages.

    Batch norm is a per-channel affine map with a positive or negative slope, so the max-pool can take the
    maxima of ``x`` (of ``-x`` where the slope is negative) before it: the full-resolution normalised tensor
    is never written, and the backward pass is one fused pass over ``x`` (the statistics' part, ``a x + c``
    per channel) plus the pooled gradient added at the argmaxes -- instead of batch norm's and max-pool's
    separate full-resolution passes and the zero-filled pooling gradient. Same values and gradients up to
    rounding (tested in float64). Differentiable once (a pass differentiated twice, such as second-order
    MAML's support pass, uses plain batch norm); fp32/fp64 inputs of at least 2x2."""
    return _NormPool.apply(x, weight, bias, eps)


def norm_pool_applies(x: torch.Tensor, weight) -> bool:
    """Whether :func:`norm_pool` can take ``x``: a 4-D fp32/fp64 tensor of the weight's dtype outside
    ``torch.func`` transforms (autocast's bf16 activations and vmap take the plain path)."""
    return (weight is not None and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype and x.shape[2] >= 2 and x.shape[3] >= 2
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch._C._functorch.is_functorch_wrapped_tensor(weight))


class Conv4(nn.Module):
    """4 x [conv 3x3 (padding 1), batch norm, ReLU, max-pool 2]; flattens the last feature map.

    (Computed as conv, batch norm, max-pool, ReLU, which gives identical outputs and gradients faster.)

    Works for any number of input channels and any image size (28x28 -> 64 features, 84x84 -> 1600).
    ``channels_last`` feeds the convolutions NHWC tensors, which is faster on CPUs with oneDNN.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_channels: int | None = None,
                 layers: int = 4, flatten: bool = True, batch_norm: bool = True):
        super().__init__()
        out_channels = out_channels or hidden
        chans = [in_channels] + [hidden] * (layers - 1) + [out_channels]
        blocks = []
        for i, o in zip(chans[:-1], chans[1:]):
            # max-pool before ReLU: max commutes with the (monotone) ReLU, so this is exactly
            # conv-BN-ReLU-pool, with the ReLU (and its backward) on a 4x smaller tensor
            blocks += [nn.Conv2d(i, o, 3, padding=1),
                       nn.BatchNorm2d(o) if batch_norm else nn.Identity(),
                       nn.MaxPool2d(2), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks)
        self.flatten = flatten
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = channels_last_input(x)
        blocks = list(self.features)
        for i in range(0, len(blocks), 4):
            conv, bn, pool, relu = blocks[i:i + 4]
            x = conv(x)
            if isinstance(bn, nn.BatchNorm2d) and bn.training and bn.momentum is not None \
                    and norm_pool_applies(x, bn.weight):
                # training-mode batch norm and the pool in one (see norm_pool); running averages as BatchNorm2d
                n = x.numel() // x.shape[1]
                x, mean, var = norm_pool(x, bn.weight, bn.bias, bn.eps)
                if bn.track_running_stats:
                    with torch.no_grad():
                        bn.num_batches_tracked += 1
                        bn.running_mean.lerp_(mean, bn.momentum)
                        bn.running_var.lerp_(var * (n / max(n - 1, 1)), bn.momentum)
            else:
                x = pool(bn(x))
            x = relu(x)
        return x.flatten(1) if self.flatten else x

    def out_dim(self, in_shape: Sequence[int]) -> int:
        with torch.no_grad():
            training = self.training
            self.eval()
            d = self(torch.zeros(1, *in_shape)).shape[1:].numel()
            self.train(training)
        return int(d)


class MLP(nn.Module):
    """Linear -> ReLU -> BatchNorm1d for each hidden size, then a final Linear (inputs are flattened)."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 256), out_dim: int = 64,
                 batch_norm: bool = True):
        super().__init__()
        layers, d = [], in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class Conv1d(nn.Module):
    """1-D convolutions over time for feature maps ``[B, 1, F, T]`` (e.g. MFCCs: F coefficients, T frames).

    The F rows are the input channels: ``layers`` x [conv k=3 (padding 1) over time, batch norm, ReLU,
    max-pool 2 (ceil mode, so short inputs keep one step)], then the mean over the remaining time steps,
    giving ``out_channels`` (default ``hidden``) features whatever T is. Also accepts ``[B, F, T]``.
    """

    def __init__(self, in_channels: int, hidden: int = 64, out_channels: int | None = None, layers: int = 4,
                 batch_norm: bool = True):
        super().__init__()
        out_channels = out_channels or hidden
        chans = [in_channels] + [hidden] * (layers - 1) + [out_channels]
        blocks = []
        for i, o in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv1d(i, o, 3, padding=1), nn.BatchNorm1d(o) if batch_norm else nn.Identity(),
                       nn.ReLU(inplace=True), nn.MaxPool1d(2, ceil_mode=True)]
        self.features = nn.Sequential(*blocks)
        self.in_channels = in_channels
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            if x.shape[1] != 1:
                raise ValueError(f"Conv1d takes [B, 1, F, T] or [B, F, T], got {tuple(x.shape)}")
            x = x[:, 0]
        return self.features(x.contiguous()).mean(-1)


def conv4(in_channels: int = 1, hidden: int = 64, **kw) -> Conv4:
    return Conv4(in_channels, hidden, **kw)


def mlp(in_dim: int, hidden: Sequence[int] = (256, 256), out_dim: int = 64, **kw) -> MLP:
    return MLP(in_dim, hidden, out_dim, **kw)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) in channels-last memory, with strides that say so even when C == 1.

    ``x.contiguous(memory_format=torch.channels_last)`` returns a 1-channel NCHW tensor unchanged (its
    strides fit both layouts), and a convolution then picks NCHW whenever its weight is NCHW too, as the
    adapted weights of a meta network's inner loop are: its 64-channel output then has to be converted,
    forward and backward, at far greater cost than this copy of the 1-channel input.

    Inside ``torch.func`` transforms (``vmap`` over tasks) ``x`` is returned as it is: a batched tensor has
    no layout of its own to choose (vmap runs a per-task-weight convolution as one grouped convolution over
    the stacked tasks) and cannot be asked for one."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x
    if x.is_contiguous(memory_format=torch.channels_last) and (x.shape[1] != 1 or x.stride(1) == 1):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def set_channels_last(module: nn.Module, enabled: bool) -> None:
    """Switch every backbone in ``module`` (and its weights) to/from the channels-last layout."""
    for m in module.modules():
        if hasattr(m, "channels_last"):
            m.channels_last = enabled
    # Module.to converts 4-D parameters *and* their gradients in place of the Parameter objects, so
    # optimisers keep working; converting only ``.data`` leaves layouts mixed and is slower.
    module.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
