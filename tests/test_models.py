"""Backbones: Conv-4 shapes, and its pool-before-ReLU ordering equals the textbook conv-BN-ReLU-pool."""
from __future__ import annotations

import pytest
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
    from fewshot.precision import auto_cpu_choice
    assert resolve_channels_last("auto", cpu) is auto_cpu_choice()[1]     # the rule: tests/test_cpu_rules.py
    assert resolve_channels_last("false", cpu) is False and resolve_channels_last("True", cpu) is True
    assert resolve_channels_last(False, cpu) is False
    with pytest.raises(FewshotError, match="channels_last"):
        resolve_channels_last("maybe", cpu)
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(FewshotError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_batch_norm_twice_matches_the_fused_kernel_to_second_order() -> None:
    """``batch_norm_twice`` (plain operations, used on second-order support passes) gives F.batch_norm's
    values, gradients and second derivatives (Hessian-vector products) in float64, for image and vector
    inputs, and its values to bf16 rounding on bf16 channels-last inputs."""
    from fewshot.models.meta import batch_norm_twice
    torch.manual_seed(0)
    for shape in [(5, 4, 6, 6), (7, 3)]:
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        r = torch.randn(shape, dtype=torch.float64)
        v = [torch.randn_like(t) for t in (x, w, b)]
        results = []
        for f in (lambda: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5),
                  lambda: batch_norm_twice(x, w, b, 1e-5)):
            y = f()
            g = torch.autograd.grad((y * r).sum(), (x, w, b), create_graph=True)
            hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), (x, w, b), allow_unused=True)
            results.append([y, *g, *(h if h is not None else torch.zeros_like(t) for h, t in zip(hv, (x, w, b)))])
        for a, c in zip(*results):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)
    x = torch.randn(5, 8, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y = batch_norm_twice(x, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.batch_norm(x.float(), None, None, w, b, True, 0.0, 1e-5),
                               rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_pool_matches_batch_norm_then_pool(channels_last: bool) -> None:
    """Conv4 in training computes batch norm + max-pool pool-first (models.norm_pool): in float64 the same
    outputs, input and weight gradients and running statistics as BatchNorm2d then MaxPool2d (the plain
    Sequential), with some batch-norm weights negative (their channels pool the minima) and an odd-sized map
    (7x7 -> 3x3); bf16 activations (autocast) keep the plain path."""
    import copy
    from fewshot.models import norm_pool_applies
    torch.manual_seed(0)
    net = Conv4(1, 6).double()
    with torch.no_grad():
        for i in (1, 5):
            net.features[i].weight[:3] *= -0.5
    set_channels_last(net, channels_last)
    ref = copy.deepcopy(net)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = net(xa)
    expect = ref.features(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb).flatten(1)
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=n)
    for (n, b), c in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=n)
    assert int(net.features[1].num_batches_tracked) == 1
    assert not norm_pool_applies(torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16), torch.ones(3))


@pytest.mark.parametrize("bn", ["transductive", "running"])
def test_meta_norm_pooled_matches_the_plain_pass(bn: str) -> None:
    """MetaNorm.pooled (the meta networks' batch norm + pool, pool-first when differentiated once) gives the
    plain pass's outputs, gradients and per-step statistics in float64."""
    from fewshot.models.meta import MetaNorm
    torch.manual_seed(1)
    norm = MetaNorm(4, bn, steps=1).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0]))
    x = torch.randn(6, 4, 10, 10, dtype=torch.float64)
    results = []
    for twice in (False, True):          # twice: the plain path (batch_norm_twice)
        xi = x.clone().requires_grad_(True)
        stats: list = []
        y = norm.pooled(xi, 0, stats, twice)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum().backward()
        results.append((y.detach(), xi.grad, norm.weight.grad.clone(), norm.bias.grad.clone(), stats))
        norm.zero_grad()
    (y0, gx0, gw0, gb0, s0), (y1, gx1, gw1, gb1, s1) = results
    torch.testing.assert_close(y0, y1, rtol=1e-10, atol=1e-12)
    for a, b in ((gx0, gx1), (gw0, gw1), (gb0, gb1)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert len(s0) == len(s1) == (1 if bn == "running" else 0)
    for (m0, v0), (m1, v1) in zip(s0, s1):
        torch.testing.assert_close(m0, m1.to(m0.dtype), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v0, v1.to(v0.dtype), rtol=1e-6, atol=1e-7)
