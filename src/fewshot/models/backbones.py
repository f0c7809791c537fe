"""Backbones for every method: the project's own networks, ResNets, wide ResNets, your own module, timm.

One entry point, :func:`build_backbone`, turns a *spec* into an ordinary ``nn.Module``:

- a registered name (:data:`NAMES`): ``conv4``, ``resnet12``, ``resnet18``, ``resnet34``, the CIFAR ResNets
  ``resnet20``/``resnet32``/``resnet56`` (any depth 6n+2), wide ResNets ``wrnD-K`` (``wrn28-10``,
  ``wrn16-4``), ``mlp``, ``conv1d`` and ``auto`` (conv4 for images, mlp otherwise);
- an ``nn.Module`` instance (used as it is), or a callable returning one;
- ``"package.module:factory"`` or ``"path/to/file.py:factory"``: a callable found by import;
- ``"timm:NAME"``: ``timm.create_model(NAME, pretrained=False, in_chans=C, num_classes=outputs or 0)``.

A factory is called with whichever of the keyword arguments ``in_shape`` (the input shape ``(C, H, W)``
or ``(D,)``) and ``outputs`` (the size of the classifier head a whole network needs) its signature
accepts; ``outputs`` is only passed when it is given. Without ``outputs`` the module is an *encoder*:
its output (``[B, D]``) is the embedding. With ``outputs`` it is a whole network, head included
(``[B, outputs]``). Every result is checked by one forward pass on a zero input of ``in_shape``; any
failure is a one-line :class:`~fewshot.errors.FewshotError` naming the spec.

The registered networks share one layout: the feature extractor, then a classifier head called ``fc``
(``nn.Identity`` for an encoder), declared by ``head_name = "fc"``; they name their *stages*
(:meth:`Backbone.stages`) for :func:`freeze`. The ImageNet ResNets carry torchvision's parameter and
buffer names exactly, so a torchvision ``state_dict`` loads into them as it is (see
:mod:`fewshot.models.weights`).
"""
from __future__ import annotations

import abc

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from . import MLP, Conv1d, Conv4

Spec = Union[str, nn.Module, Callable[..., nn.Module]]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------ shared layout
class Backbone(metaclass=abc.ABCMeta):
    """What the registered networks share (a mixin for ``nn.Module`` subclasses).

    The feature extractor is everything but ``fc``; :meth:`embed` runs it, ``forward`` adds the head.
    :meth:`stages` names groups of parameters in input-to-output order for :func:`freeze`.
    """

    head_name = "fc"
    features_dim: int  #: the size of the embedding (the input of ``fc``)

    @abc.abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` (everything but the head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))

    @abc.abstractmethod
    def stage_modules(self) -> "OrderedDict[str, Sequence[str]]":
        """Stage name -> names of the submodules it holds (input to output order; the head last)."""

    def stages(self) -> "OrderedDict[str, Tuple[str, ...]]":
        """Stage name -> parameter-name prefixes, in input-to-output order, the head (``fc``) last."""
        return OrderedDict((k, tuple(m + "." for m in v)) for k, v in self.stage_modules().items())


def _init_convs(module: nn.Module, nonlinearity: str = "relu", a: float = 0.0) -> None:
    """He initialisation (fan-out) of every convolution in ``module``, as the ResNet papers use."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity, a=a)


def _head(features: int, outputs: Optional[int]) -> nn.Module:
    return nn.Linear(features, int(outputs)) if outputs else nn.Identity()


def _image_shape(name: str, in_shape: Sequence[int], min_size: int = 1) -> Tuple[int, int, int]:
    if len(in_shape) != 3:
        raise FewshotError(f"backbone {name} needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    c, h, w = (int(s) for s in in_shape)
    if min(h, w) < min_size:
        raise FewshotError(f"backbone {name} needs images of at least {min_size}x{min_size} pixels, got {h}x{w}")
    return c, h, w


# ------------------------------------------------------------------------------------------ the project's own
def _block_stages(layers: int) -> "OrderedDict":
    """Stages of fewshot's own block encoders (Conv4, Conv1d): each block's conv and norm, then the head."""
    s = OrderedDict((f"block{i + 1}", (f"features.{4 * i}", f"features.{4 * i + 1}")) for i in range(layers))
    s["fc"] = ("fc",)
    return s


class Conv4Net(Backbone, Conv4):
    """:class:`~fewshot.models.Conv4` (same parameter names) with a classifier head ``fc``.

    Stages ``block1`` .. ``block4`` (each conv with its batch norm), then ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None, hidden: int = 64,
                 layers: int = 4, batch_norm: bool = True):
        c, h, w = _image_shape("conv4", in_shape, 2 ** layers)
        Conv4.__init__(self, c, hidden, layers=layers, batch_norm=batch_norm)
        self.layers = layers
        self.features_dim = hidden * (h >> layers) * (w >> layers)  # each block halves (floor) the map
        self.fc = _head(self.features_dim, outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return Conv4.forward(self, x)

    def stage_modules(self):
        return _block_stages(self.layers)


class MLPNet(Backbone, MLP):
    """:class:`~fewshot.models.MLP` over the flattened input (same parameter names) with a head ``fc``.

    Stages ``layer1`` .. ``layerK`` (each linear layer with its batch norm; the last is the embedding
    layer), then ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None,
                 hidden: Sequence[int] = (256, 256), embedding: int = 64, batch_norm: bool = True):
        MLP.__init__(self, int(torch.Size(in_shape).numel()), tuple(hidden), embedding, batch_norm)
        self.features_dim = int(embedding)
        self.fc = _head(self.features_dim, outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return MLP.forward(self, x)

    def stage_modules(self):
        s: "OrderedDict[str, list]" = OrderedDict()
        for i, m in enumerate(self.net):
            if isinstance(m, nn.Linear):
                s[f"layer{len(s) + 1}"] = []
            if any(True for _ in m.parameters()):
                s[f"layer{len(s)}"].append(f"net.{i}")
        s["fc"] = ["fc"]
        return s


class Conv1dNet(Backbone, Conv1d):
    """:class:`~fewshot.models.Conv1d` for feature maps ``(1, F, T)`` (MFCCs) with a head ``fc``.

    Stages ``block1`` .. ``block4``, then ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None, hidden: int = 64,
                 layers: int = 4, batch_norm: bool = True):
        if len(in_shape) != 3 or int(in_shape[0]) != 1:
            raise FewshotError(f"backbone conv1d needs feature maps (1, F, T) such as MFCCs, "
                               f"got shape {tuple(in_shape)}")
        Conv1d.__init__(self, int(in_shape[1]), hidden, layers=layers, batch_norm=batch_norm)
        self.layers = layers
        self.features_dim = int(hidden)
        self.fc = _head(self.features_dim, outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return Conv1d.forward(self, x)

    def stage_modules(self):
        return _block_stages(self.layers)


# ------------------------------------------------------------------------------------------ ResNet-12
class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero ``block_size`` x ``block_size`` squares of a
    feature map so that about ``rate`` of it is dropped, and rescale the rest; the identity otherwise.

    Block seeds are drawn where a whole block fits, with probability
    ``gamma = rate / block_size**2 * H * W / ((H - block_size + 1) * (W - block_size + 1))`` (the
    paper's equation 1); ``rate`` is an attribute so that a schedule can raise it during training."""

    def __init__(self, rate: float = 0.0, block_size: int = 5):
        super().__init__()
        self.rate, self.block_size = float(rate), int(block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate <= 0:
            return x
        h, w = x.shape[-2:]
        bs = max(1, min(self.block_size, h, w))
        gamma = self.rate / bs ** 2 * h * w / ((h - bs + 1) * (w - bs + 1))
        seeds = (torch.rand(*x.shape[:-2], h - bs + 1, w - bs + 1, device=x.device) < gamma).to(x.dtype)
        # a seed at (i, j) drops rows i..i+bs-1 and columns j..j+bs-1: pad by bs-1 all round, then a
        # stride-1 max-pool of size bs gives back an H x W map
        dropped = F.max_pool2d(F.pad(seeds, (bs - 1, bs - 1, bs - 1, bs - 1)), bs, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"rate={self.rate}, block_size={self.block_size}"


class ResNet12Block(nn.Module):
    """Three [conv 3x3, batch norm, LeakyReLU(0.1)] (the last activation after the residual sum), a
    shortcut of conv 1x1 + batch norm (``downsample``), a 2x2 max-pool, then dropout or DropBlock.
    (Computed with the pool before the last activation: identical outputs and gradients, less work.)"""

    def __init__(self, cin: int, cout: int, drop_rate: float = 0.0, drop_block: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.drop_rate = float(drop_rate)
        self.dropblock = DropBlock2d(drop_rate, drop_block) if drop_block else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: batch norm's backward needs its input, not its output, so one activation map less is kept
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1, inplace=True)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1, inplace=True)
        # max-pool before the last LeakyReLU: max commutes with a strictly monotone map, so the outputs and
        # gradients are those of activation-then-pool, with the activation (and its saved input) 4x smaller
        out = F.leaky_relu(F.max_pool2d(self.bn3(self.conv3(out)) + self.downsample(x), 2), 0.1)
        if self.dropblock is not None:
            return self.dropblock(out)
        if self.drop_rate > 0:
            return F.dropout(out, self.drop_rate, self.training)
        return out


class ResNet12(Backbone, nn.Module):
    """ResNet-12 of TADAM / MetaOptNet: 4 :class:`ResNet12Block` of ``widths`` (64-160-320-640) channels,
    each halving the image, then a global average (``pool="avg"``, 640 features) or the flattened map
    (``pool="flatten"``, as in MetaOptNet: 640x5x5 for 84x84), then the head ``fc``.

    Regularisation as in MetaOptNet: ``drop_rate`` > 0 is dropout after blocks 1-2 and DropBlock (squares
    of ``drop_block`` pixels) after blocks 3-4, whose rate rises linearly from 0 to ``drop_rate`` over the
    first ``drop_ramp`` training forward passes (0: the full rate at once). MetaOptNet used 0.1, 5 and
    40 000. The count is ``drop_calls``; a trainer that resumes can set it.

    Stages ``layer1`` .. ``layer4``, ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None,
                 widths: Sequence[int] = (64, 160, 320, 640), pool: str = "avg", drop_rate: float = 0.0,
                 drop_block: int = 5, drop_ramp: int = 0):
        super().__init__()
        c, h, w = _image_shape("resnet12", in_shape, 2 ** len(widths))
        if pool not in ("avg", "flatten"):
            raise FewshotError(f"unknown resnet12 pool {pool!r}; choose avg or flatten")
        chans = [c] + [int(x) for x in widths]
        for i in range(len(widths)):
            late = i >= len(widths) - 2
            self.add_module(f"layer{i + 1}", ResNet12Block(chans[i], chans[i + 1], drop_rate,
                                                          drop_block if late and drop_rate > 0 else 0))
        self.depth = len(widths)
        self.pool = pool
        self.drop_rate, self.drop_ramp, self.drop_calls = float(drop_rate), int(drop_ramp), 0
        for _ in range(self.depth):
            h, w = h // 2, w // 2
        self.features_dim = chans[-1] * (h * w if pool == "flatten" else 1)
        self.fc = _head(self.features_dim, outputs)
        _init_convs(self, "leaky_relu", 0.1)

    def _schedule(self) -> None:
        rate = self.drop_rate
        if self.drop_ramp > 0:
            rate *= min(1.0, self.drop_calls / self.drop_ramp)
        for m in self.modules():
            if isinstance(m, DropBlock2d):
                m.rate = rate
        self.drop_calls += 1

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_rate > 0:
            self._schedule()
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.flatten(1) if self.pool == "flatten" else x.mean((2, 3))

    def stage_modules(self):
        s = OrderedDict((f"layer{i + 1}", (f"layer{i + 1}",)) for i in range(self.depth))
        s["fc"] = ("fc",)
        return s


# ------------------------------------------------------------------------------------------ ImageNet ResNets
class BasicBlock(nn.Module):
    """Two 3x3 conv + batch norm with a ReLU between, added to the input (through ``downsample``, a 1x1
    conv + batch norm, where the stride or width changes), then a ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(Backbone, nn.Module):
    """ResNet-18/34 of He et al. 2016 (ImageNet form): a 7x7 stride-2 conv (``conv1``, ``bn1``), a 3x3
    stride-2 max-pool, four stages ``layer1`` .. ``layer4`` of :class:`BasicBlock` with 64, 128, 256, 512
    channels (stride 2 from the second on), a global average and the head ``fc``.

    Parameter and buffer names are torchvision's, so its ``resnet18``/``resnet34`` state_dicts load as
    they are (``outputs=1000`` keeps its head; any ``in_channels`` but 3 changes ``conv1.weight``'s
    shape). Stages: ``stem`` (conv1, bn1), ``layer1`` .. ``layer4``, ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None,
                 blocks: Sequence[int] = (2, 2, 2, 2), zero_init_residual: bool = False):
        super().__init__()
        c, _, _ = _image_shape({(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}.get(tuple(blocks), "resnet"),
                               in_shape)
        self.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin, width, stride)] + [BasicBlock(width, width) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.features_dim = cin
        self.fc = _head(cin, outputs)
        _init_convs(self)
        if zero_init_residual:  # each residual branch starts at 0, so each block starts as the identity
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def stage_modules(self):
        return OrderedDict([("stem", ("conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
                            ("layer3", ("layer3",)), ("layer4", ("layer4",)), ("fc", ("fc",))])


# ------------------------------------------------------------------------------------------ CIFAR ResNets
class ShortcutA(nn.Module):
    """He et al.'s option A shortcut: the input subsampled by ``stride``, extra channels zero-padded
    (no parameters)."""

    def __init__(self, extra: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))


class CifarBlock(nn.Module):
    """Two 3x3 conv + batch norm with a ReLU between, plus a shortcut (option A: identity with zero-padded
    channels; option B: 1x1 conv + batch norm, ``downsample``) where the shape changes, then a ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.downsample = None
        elif shortcut == "A":
            self.downsample = ShortcutA(cout - cin, stride)
        else:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(Backbone, nn.Module):
    """The CIFAR ResNets of He et al. 2016 section 4.2: a 3x3 conv of 16 channels, three stages of ``n``
    :class:`CifarBlock` with 16, 32, 64 channels (the second and third start with stride 2), a global
    average and the head ``fc``: depth 6n+2 (ResNet-20: n = 3, -32: 5, -56: 9), 64 features.

    ``shortcut="A"`` (the paper's choice for CIFAR, no extra parameters) or ``"B"`` (1x1 projections).
    Stages: ``stem`` (conv1, bn1), ``layer1`` .. ``layer3``, ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None, depth: int = 20,
                 shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise FewshotError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise FewshotError(f"unknown shortcut {shortcut!r}; choose A (zero padding) or B (projection)")
        c, _, _ = _image_shape(f"resnet{depth}", in_shape)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            stride = 1 if i == 0 else 2
            layer = [CifarBlock(cin, width, stride, shortcut)]
            layer += [CifarBlock(width, width, 1, shortcut) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = width
        self.features_dim = cin
        self.fc = _head(cin, outputs)
        _init_convs(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean((2, 3))

    def stage_modules(self):
        return OrderedDict([("stem", ("conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
                            ("layer3", ("layer3",)), ("fc", ("fc",))])


# ------------------------------------------------------------------------------------------ wide ResNets
class WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet: batch norm, ReLU, 3x3 conv, batch norm, ReLU, dropout, 3x3
    conv, added to the input (through ``downsample``, a 1x1 conv of the pre-activated input, where the
    width or stride changes)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = float(dropout)
        self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + (x if self.downsample is None else self.downsample(pre))


class WideResNet(Backbone, nn.Module):
    """WRN-``depth``-``width`` of Zagoruyko & Komodakis 2016: a 3x3 conv of 16 channels, three groups of
    (depth - 4) / 6 :class:`WideBlock` with 16k, 32k, 64k channels (k = ``width``; strides 1, 2, 2), a
    final batch norm and ReLU, a global average (64k features: 640 for WRN-28-10) and the head ``fc``.

    Stages: ``stem`` (conv1), ``layer1`` .. ``layer3`` (the last with the final batch norm), ``fc``."""

    def __init__(self, in_shape: Sequence[int], outputs: Optional[int] = None, depth: int = 28,
                 width: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise FewshotError(f"a wide ResNet has depth 6n+4 (16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise FewshotError(f"a wide ResNet's width factor must be at least 1, got {width}")
        c, _, _ = _image_shape(f"wrn{depth}-{width}", in_shape)
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        cin = 16
        for i, w in enumerate((16 * width, 32 * width, 64 * width)):
            stride = 1 if i == 0 else 2
            layer = [WideBlock(cin, w, stride, dropout)] + [WideBlock(w, w, 1, dropout) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = w
        self.bn = nn.BatchNorm2d(cin)
        self.features_dim = cin
        self.fc = _head(cin, outputs)
        _init_convs(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.relu(self.bn(x)).mean((2, 3))

    def stage_modules(self):
        return OrderedDict([("stem", ("conv1",)), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
                            ("layer3", ("layer3", "bn")), ("fc", ("fc",))])


# ------------------------------------------------------------------------------------------ the registry
def _auto(in_shape, outputs=None, **kw):
    return Conv4Net(in_shape, outputs, **kw) if len(in_shape) == 3 else MLPNet(in_shape, outputs, **kw)


REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "auto": _auto,
    "conv4": Conv4Net,
    "mlp": MLPNet,
    "conv1d": Conv1dNet,
    "resnet12": ResNet12,
    "resnet18": lambda in_shape, outputs=None, zero_init_residual=False:
        ResNet(in_shape, outputs, (2, 2, 2, 2), zero_init_residual),
    "resnet34": lambda in_shape, outputs=None, zero_init_residual=False:
        ResNet(in_shape, outputs, (3, 4, 6, 3), zero_init_residual),
}
#: every name :func:`build_backbone` knows, for messages and ``--help``
NAMES = ("conv4", "resnet12", "resnet18", "resnet34", "resnet20", "resnet32", "resnet56", "wrn28-10",
         "mlp", "conv1d", "auto")
_CIFAR = re.compile(r"resnet(\d+)$")
_WRN = re.compile(r"wrn-?(\d+)-(\d+)$")


def _registered(name: str) -> Optional[Callable[..., nn.Module]]:
    key = name.lower()
    if key in REGISTRY:
        return REGISTRY[key]
    m = _CIFAR.match(key)
    if m and (int(m.group(1)) - 2) % 6 == 0 and int(m.group(1)) >= 8:
        depth = int(m.group(1))
        return lambda in_shape, outputs=None, shortcut="A": CifarResNet(in_shape, outputs, depth, shortcut)
    m = _WRN.match(key)
    if m:
        depth, width = int(m.group(1)), int(m.group(2))
        return lambda in_shape, outputs=None, dropout=0.0: WideResNet(in_shape, outputs, depth, width, dropout)
    return None


# ------------------------------------------------------------------------------------------ specs
def _spec_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, nn.Module):
        return f"{type(spec).__name__} instance"
    return getattr(spec, "__qualname__", None) or repr(spec)


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise FewshotError(f"backbone {spec}: file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    modname = f"fewshot_user_backbone_{path.stem}_{digest}"
    if modname in sys.modules:
        return sys.modules[modname]
    loader_spec = importlib.util.spec_from_file_location(modname, path)
    if loader_spec is None or loader_spec.loader is None:
        raise FewshotError(f"backbone {spec}: {path} cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[modname] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so that the file can import its neighbours
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[modname]
        raise FewshotError(f"backbone {spec}: running {path} raised {_first_line(e)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _import(modname: str, spec: str):
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        raise FewshotError(f"backbone {spec}: cannot import module {modname} ({_first_line(e)})") from None
    except Exception as e:
        raise FewshotError(f"backbone {spec}: importing {modname} raised {_first_line(e)}") from None


def resolve(spec: str) -> Callable[..., nn.Module]:
    """The factory a ``"module:attr"`` or ``"file.py:attr"`` spec names (``attr`` may be dotted)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise FewshotError(f"backbone {spec}: give a factory as package.module:factory or path/to/file.py:factory")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(Path(where).expanduser(), spec)
        origin = str(where)
    else:
        module = _import(where, spec)
        origin = f"module {where}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FewshotError(f"backbone {spec}: {origin} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FewshotError(f"backbone {spec}: {attr} is a {type(obj).__name__}, not a callable returning a module")
    return obj


def _accepted(fn: Callable) -> Tuple[set, bool]:
    """Names ``fn`` takes as keywords, and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _call_factory(fn: Callable, name: str, in_shape, outputs, kw: dict) -> Any:
    names, var = _accepted(fn)
    unknown = [k for k in kw if k not in names and not var]
    if unknown:
        options = ", ".join(sorted(names - {"in_shape", "outputs", "self"})) or "none"
        raise FewshotError(f"backbone {name} takes no option {unknown[0]!r} (its options: {options})")
    args = dict(kw)
    if "in_shape" in names or var:
        args["in_shape"] = tuple(int(s) for s in in_shape)
    if outputs is not None and ("outputs" in names or var):
        args["outputs"] = int(outputs)
    try:
        return fn(**args)
    except FewshotError as e:
        msg = str(e)
        raise FewshotError(msg if name in msg else f"backbone {name}: {msg}") from None
    except Exception as e:
        raise FewshotError(f"backbone {name}: its factory raised {_first_line(e)}") from None


def _timm(name: str, spec: str, in_shape, outputs, kw: dict) -> nn.Module:
    try:
        import timm  # noqa: F401  (optional: pip install 'fewshot[timm]')
    except Exception as e:
        raise FewshotError(f"backbone {spec}: timm could not be imported ({_first_line(e)}); install "
                           f"fewshot[timm], with a torchvision built for this torch") from None
    if len(in_shape) != 3:
        raise FewshotError(f"backbone {spec} needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=int(outputs or 0),
                                  in_chans=int(in_shape[0]), **kw)
    except Exception as e:
        raise FewshotError(f"backbone {spec}: timm could not build {name!r} ({_first_line(e)})") from None
    return model


def _probe(module: nn.Module, in_shape: Sequence[int], name: str, head: Optional[str] = None):
    """Run ``module`` once in eval mode on zeros of shape ``(2, *in_shape)``: its output (and the input
    of submodule ``head``, when given). Training flags are restored module by module."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        p = next(iter(module.parameters()), None)
        x = torch.zeros(2, *(int(s) for s in in_shape),
                        device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        seen: dict = {}
        handle = None
        if head is not None:
            handle = module.get_submodule(head).register_forward_hook(
                lambda m, inp, out: seen.setdefault("z", inp[0]))
        module.eval()
        try:
            with torch.no_grad():
                out = module(x)
        except Exception as e:
            raise FewshotError(f"backbone {name}: a check forward pass on a zero input of shape "
                               f"{tuple(int(s) for s in in_shape)} failed ({_first_line(e)})") from None
        finally:
            if handle is not None:
                handle.remove()
    finally:
        for m, t in flags:
            m.training = t
    return out, seen.get("z")


def declared_head(module: nn.Module) -> Optional[str]:
    """The name of the classifier head ``module`` declares, parameters or not: its ``head_name`` attribute
    (the registered networks: ``fc``, an ``nn.Identity`` in an encoder), or a timm model's
    ``pretrained_cfg["classifier"]``; ``None`` when it declares none."""
    name = getattr(module, "head_name", None)
    if not isinstance(name, str):
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
        name = cfg.get("classifier") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else None


def head_name(module: nn.Module) -> Optional[str]:
    """The declared classifier head (:func:`declared_head`) when it is a submodule holding parameters;
    ``None`` otherwise (no head declared, or an encoder's ``nn.Identity``)."""
    name = declared_head(module)
    if name is None:
        return None
    try:
        sub = module.get_submodule(name)
    except AttributeError:
        return None
    return name if any(True for _ in sub.parameters()) else None


def find_head(module: nn.Module, name: Optional[str] = None) -> Optional[str]:
    """The name of ``module``'s classifier head: ``name`` when given (it must name a submodule), else the
    declared head (:func:`head_name`), else the last ``nn.Linear`` in module order; ``None`` if none."""
    if name is not None:
        try:
            module.get_submodule(name)
        except AttributeError:
            subs = [n for n, _ in module.named_modules() if n]
            raise FewshotError(f"head {name!r} is not a submodule of {type(module).__name__} "
                               f"(it has: {', '.join(subs[:8])}{', ...' if len(subs) > 8 else ''})") from None
        return name
    declared = head_name(module)
    if declared is not None:
        return declared
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def feature_dim(module: nn.Module, in_shape: Sequence[int], head: Optional[str] = None) -> int:
    """The number of features ``module`` computes for one input of ``in_shape``: what its classifier head
    receives (``head``, or the head it declares, see :func:`head_name`), or, for an encoder without a
    head, the size of its output. Measured by one forward pass in eval mode (training flags restored)."""
    head = head if head is not None else head_name(module)
    out, z = _probe(module, in_shape, _spec_name(module), head)
    t = z if z is not None else out
    if not isinstance(t, torch.Tensor):
        raise FewshotError(f"backbone {_spec_name(module)} returns a {type(t).__name__}, not a tensor")
    return int(t.shape[1:].numel())


def build_backbone(spec: Spec, in_shape: Sequence[int], outputs: Optional[int] = None, check: bool = True,
                   **kw) -> nn.Module:
    """The ``nn.Module`` that ``spec`` names, for inputs of ``in_shape`` (see the module docstring).

    ``outputs`` asks for a whole network with a head of that many outputs; without it, an encoder.
    ``kw`` are options of the registered network or factory (e.g. ``hidden=32``, ``drop_rate=0.1``).
    With ``check`` (the default), one forward pass on zeros checks that the output is ``[B, D]`` (and
    ``D == outputs`` when given); every failure is a one-line :class:`FewshotError` naming ``spec``.
    """
    name = _spec_name(spec)
    in_shape = tuple(int(s) for s in in_shape)
    if isinstance(spec, nn.Module):
        if kw:
            raise FewshotError(f"backbone {name}: options ({', '.join(kw)}) need a factory, not a module")
        module: Any = spec
    elif isinstance(spec, str):
        if spec.lower().startswith("timm:"):
            module = _timm(spec[5:], spec, in_shape, outputs, kw)
        elif ":" in spec:
            module = _call_factory(resolve(spec), spec, in_shape, outputs, kw)
        else:
            fn = _registered(spec)
            if fn is None:
                raise FewshotError(f"unknown backbone {spec!r}; choose from {', '.join(NAMES)} "
                                   f"(resnet6n+2, wrnD-K), timm:NAME, or package.module:factory / file.py:factory")
            module = _call_factory(fn, spec, in_shape, outputs, kw)
    elif callable(spec):
        module = _call_factory(spec, name, in_shape, outputs, kw)
    else:
        raise FewshotError(f"backbone {name}: give a name, an nn.Module, a callable or 'module:factory', "
                           f"not a {type(spec).__name__}")
    if not isinstance(module, nn.Module):
        raise FewshotError(f"backbone {name} returned an object of type {type(module).__name__}, "
                           f"not a torch.nn.Module")
    if check:
        out, _ = _probe(module, in_shape, name)
        if not isinstance(out, torch.Tensor):
            raise FewshotError(f"backbone {name} returns a {type(out).__name__}, not a tensor")
        if out.dim() != 2 or out.shape[0] != 2:
            raise FewshotError(f"backbone {name} maps inputs of shape {in_shape} to outputs of shape "
                               f"{tuple(out.shape[1:])} each; it must give one vector per input "
                               f"(end it with nn.Flatten())")
        if outputs is not None and out.shape[1] != int(outputs):
            raise FewshotError(f"backbone {name} gives {out.shape[1]} outputs per input, the method's head "
                               f"needs {int(outputs)}")
    return module


# ------------------------------------------------------------------------------------------ freezing
def stages(module: nn.Module) -> "OrderedDict[str, Tuple[str, ...]]":
    """Stage name -> parameter-name prefixes, input to output: the network's own (:meth:`Backbone.stages`)
    or, for any other module, one stage per top-level child."""
    own = getattr(module, "stages", None)
    if callable(own):
        return own()
    if isinstance(module, (Conv4, Conv1d)):     # fewshot's own encoders (the metric methods' conv4/conv1d)
        return OrderedDict((f"block{i + 1}", (f"features.{4 * i}.", f"features.{4 * i + 1}."))
                           for i in range(len(module.features) // 4))
    if isinstance(module, MLP):
        return OrderedDict((k, tuple(m + "." for m in v)) for k, v in MLPNet.stage_modules(module).items()
                           if k != "fc")
    from .meta import MetaConv4, MetaMLP
    if isinstance(module, (MetaConv4, MetaMLP)):        # the gradient-based family's functional nets
        parts, word = (module.convs, "block") if isinstance(module, MetaConv4) else (module.layers, "layer")
        kind = "convs" if isinstance(module, MetaConv4) else "layers"
        st = OrderedDict((f"{word}{i + 1}", (f"{kind}.{i}.", f"norms.{i}.")) for i in range(len(parts)))
        st["head"] = ("head.",)
        return st
    return OrderedDict((n, (n + ".",)) for n, _ in module.named_children())


def freeze(module: nn.Module, what: str = "all", head: Optional[str] = None) -> List[str]:
    """Stop gradients to part of ``module`` (``requires_grad = False``); returns the names frozen.

    ``what``: ``"all"``, the whole feature extractor (every parameter but the classifier head's, if the
    module has one: ``head`` or the one it declares; the linear-probe set-up); a stage name (see
    :func:`stages`: ``stem``, ``layer1`` .. ``layer4`` for the ResNets, ``block1`` .. for conv4), which
    freezes that stage *and every stage before it*; or ``"none"``. Batch-norm running statistics are
    buffers and keep following the module's train/eval mode.
    """
    what = str(what)
    if what == "none":
        return []
    named = list(module.named_parameters())
    if what == "all":
        head = head if head is not None else head_name(module)
        chosen = [n for n, _ in named if head is None or not (n == head or n.startswith(head + "."))]
    else:
        st = stages(module)
        if what not in st:
            raise FewshotError(f"unknown stage {what!r} to freeze in {type(module).__name__}; choose all, none "
                               f"or one of {', '.join(st)}")
        prefixes: Tuple[str, ...] = ()
        for k, v in st.items():
            prefixes += tuple(v)
            if k == what:
                break
        chosen = [n for n, _ in named if n.startswith(prefixes)]
    names = set(chosen)
    for n, p in named:
        if n in names:
            p.requires_grad_(False)
    return chosen
