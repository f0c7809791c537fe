"""Backbones: Conv-4 for images, an MLP for vectors, 1-D convolutions over time for audio features."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


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
        z = self.features(x)
        return z.flatten(1) if self.flatten else z

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
