"""Backbones: Conv-4 shapes, and its pool-before-ReLU ordering equals the textbook conv-BN-ReLU-pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.models import Conv4, MLP, set_channels_last


def _textbook(net: Conv4) -> nn.Sequential:
    layers = []
    mods = list(net.features)
    for i in range(0, len(mods), 4):
        conv, bn = mods[i], mods[i + 1]
        layers += [conv, bn, nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten())


def test_conv4_equals_conv_bn_relu_pool_forward_and_backward() -> None:
    torch.manual_seed(0)
    net = Conv4(1, 8).double()
    ref = _textbook(net)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    a = net(x)
    (a ** 2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    b = ref(x)
    (b ** 2).sum().backward()
    assert torch.allclose(a, b)
    for g, p in zip(grads, net.parameters()):
        assert torch.allclose(g, p.grad)


def test_conv4_shapes_and_channels_last() -> None:
    net = Conv4(3, 16)
    assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 16)
    assert net(torch.zeros(2, 3, 84, 84)).shape == (2, 16 * 5 * 5)
    assert net.out_dim((3, 84, 84)) == 400
    set_channels_last(net, True)
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    net.eval()
    x = torch.rand(2, 3, 28, 28)
    y = net(x)
    set_channels_last(net, False)
    assert net.features[0].weight.is_contiguous()
    assert torch.allclose(y, net(x), atol=1e-5)


def test_channels_last_input_fixes_one_channel_strides() -> None:
    """A 1-channel batch gets strides a convolution reads as channels-last, so a conv with an NCHW weight
    (an inner loop's adapted weight) still produces a channels-last output, with no conversion of it."""
    from fewshot.models import channels_last_input
    x = torch.rand(3, 1, 8, 8)
    assert x.contiguous(memory_format=torch.channels_last).stride() == x.stride()    # the trap
    y = channels_last_input(x)
    assert y.stride() == (64, 1, 8, 1) and torch.equal(y, x)
    assert channels_last_input(y) is y
    w = torch.rand(4, 1, 3, 3)                                                   # NCHW weight
    assert not F.conv2d(x, w, padding=1).is_contiguous(memory_format=torch.channels_last)
    assert F.conv2d(y, w, padding=1).is_contiguous(memory_format=torch.channels_last)
    z = torch.rand(3, 5, 8, 8).contiguous(memory_format=torch.channels_last)
    assert channels_last_input(z) is z
    nchw = torch.rand(3, 5, 8, 8)
    assert channels_last_input(nchw).is_contiguous(memory_format=torch.channels_last)


def test_mlp_flattens() -> None:
    m = MLP(12, (8, 8), 4)
    assert m(torch.zeros(5, 3, 4)).shape == (5, 4)


def test_precision_and_layout_resolution() -> None:
    import pytest
    from fewshot.errors import FewshotError
    from fewshot.precision import resolve_channels_last, resolve_precision
    cpu = torch.device("cpu")
    assert resolve_channels_last("auto", cpu) is True
    assert resolve_channels_last("false", cpu) is False and resolve_channels_last("True", cpu) is True
    assert resolve_channels_last(False, cpu) is False
    with pytest.raises(FewshotError, match="channels_last"):
        resolve_channels_last("maybe", cpu)
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(FewshotError, match="unknown precision"):
        resolve_precision("fp8", cpu)
