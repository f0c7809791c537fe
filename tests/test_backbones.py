"""Backbones (fewshot.models.backbones) and pretrained weights from local files (fewshot.models.weights)."""
from __future__ import annotations

import os
import sys
import textwrap
import types
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fewshot.errors import FewshotError
from fewshot.models import Conv4
from fewshot.models.backbones import (NAMES, DropBlock2d, build_backbone, declared_head, feature_dim, find_head,
                                      freeze, head_name, stages)
from fewshot.models.weights import load_weights, read_safetensors, read_state_dict, save_weights, write_safetensors


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ building
# (name, {in_shape: feature dim}); wrn28-10 (36.5M parameters) only at 28x28: at 84x84 one forward pass
# takes seconds here; its class is checked at 84x84 and 32x32 through wrn16-4
CASES = [
    ("conv4", {(1, 28, 28): 64, (3, 84, 84): 64 * 5 * 5, (3, 32, 32): 64 * 2 * 2}),
    ("resnet12", {(1, 28, 28): 640, (3, 84, 84): 640}),
    ("resnet18", {(1, 28, 28): 512, (3, 84, 84): 512}),
    ("resnet34", {(1, 28, 28): 512, (3, 84, 84): 512}),
    ("resnet20", {(1, 28, 28): 64, (3, 84, 84): 64, (3, 32, 32): 64}),
    ("resnet32", {(1, 28, 28): 64, (3, 84, 84): 64, (3, 32, 32): 64}),
    ("resnet56", {(1, 28, 28): 64, (3, 84, 84): 64, (3, 32, 32): 64}),
    ("wrn16-4", {(1, 28, 28): 256, (3, 84, 84): 256, (3, 32, 32): 256}),
    ("wrn28-10", {(1, 28, 28): 640}),
    ("mlp", {(1, 28, 28): 64, (3, 84, 84): 64, (20,): 64}),
    ("conv1d", {(1, 13, 40): 64, (1, 20, 7): 64}),
]


@pytest.mark.parametrize("name,shapes", CASES, ids=[c[0] for c in CASES])
def test_every_backbone_builds_for_any_channels_and_size_and_gives_its_feature_dim(name, shapes) -> None:
    for shape, dim in shapes.items():
        enc = build_backbone(name, shape)
        assert isinstance(enc, nn.Module)
        assert feature_dim(enc, shape) == dim == enc.features_dim
        assert isinstance(enc.fc, nn.Identity) and head_name(enc) is None and declared_head(enc) == "fc"
    # a whole network (the head does not depend on the input size; checked once)
    shape, dim = next(iter(shapes.items()))
    net = build_backbone(name, shape, outputs=5, check=False)
    assert head_name(net) == "fc" and find_head(net) == "fc"
    assert feature_dim(net, shape) == dim  # the head's input
    net.train()
    assert net(torch.rand(2, *shape)).shape == (2, 5)
    assert net.training and all(m.training for m in net.modules())  # the probe restored the flags


def test_names_and_auto() -> None:
    for name in NAMES:
        assert build_backbone(name, (1, 28, 28) if name != "conv1d" else (1, 13, 20), check=False) is not None
    assert type(build_backbone("auto", (1, 28, 28))).__name__ == "Conv4Net"
    assert type(build_backbone("auto", (10,))).__name__ == "MLPNet"
    assert type(build_backbone("WRN-16-2", (3, 32, 32))).__name__ == "WideResNet"


def test_conv4_is_the_projects_conv4_with_its_parameter_names() -> None:
    net = build_backbone("conv4", (1, 28, 28))
    assert isinstance(net, Conv4)
    plain = Conv4(1, 64)
    assert list(net.state_dict()) == list(plain.state_dict())  # today's protonet encoders load as they are
    net.load_state_dict(plain.state_dict())
    x = torch.rand(3, 1, 28, 28)
    net.eval(), plain.eval()
    assert torch.equal(net(x), plain(x))


def test_published_parameter_counts() -> None:
    """ResNet-12 (64-160-320-640, no head) has 12,424,320 parameters, the ~12.4M of MetaOptNet/TADAM;
    the CIFAR ResNets with a 10-way head 0.27M / 0.46M / 0.85M and WRN-16-4 2.7M (He et al. 2016,
    table 6; Zagoruyko & Komodakis 2016); ResNet-18/34 with their 1000-way head torchvision's 11,689,512
    and 21,797,672."""
    assert n_params(build_backbone("resnet12", (3, 84, 84))) == 12_424_320
    assert n_params(build_backbone("resnet12", (3, 84, 84), pool="flatten")) == 12_424_320
    assert feature_dim(build_backbone("resnet12", (3, 84, 84), pool="flatten"), (3, 84, 84)) == 640 * 5 * 5
    for name, millions in (("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)):
        assert round(n_params(build_backbone(name, (3, 32, 32), outputs=10, check=False)) / 1e6, 2) == millions
    assert round(n_params(build_backbone("wrn16-4", (3, 32, 32), outputs=10, check=False)) / 1e6, 1) == 2.7
    assert n_params(build_backbone("resnet18", (3, 32, 32), outputs=1000, check=False)) == 11_689_512
    assert n_params(build_backbone("resnet34", (3, 32, 32), outputs=1000, check=False)) == 21_797_672


def test_wrn28_10_has_36_5m_parameters() -> None:
    assert round(n_params(build_backbone("wrn28-10", (3, 32, 32), outputs=10, check=False)) / 1e6, 1) == 36.5


def test_cifar_resnet_option_b_and_bad_depths() -> None:
    a = build_backbone("resnet20", (3, 32, 32))
    b = build_backbone("resnet20", (3, 32, 32), shortcut="B")
    assert n_params(b) > n_params(a)  # 1x1 projections where the width changes
    assert "layer2.0.downsample.0.weight" in b.state_dict() and "layer2.0.downsample.0.weight" not in a.state_dict()
    with pytest.raises(FewshotError, match="unknown backbone 'resnet21'"):
        build_backbone("resnet21", (3, 32, 32))
    with pytest.raises(FewshotError, match="depth 6n\\+4"):
        build_backbone("wrn27-2", (3, 32, 32))


def test_small_images_are_refused_by_name() -> None:
    with pytest.raises(FewshotError, match=r"^backbone conv4 needs images of at least 16x16 pixels, got 8x8$"):
        build_backbone("conv4", (1, 8, 8))
    with pytest.raises(FewshotError, match="backbone resnet12 needs images of at least 16x16"):
        build_backbone("resnet12", (3, 12, 12))
    with pytest.raises(FewshotError, match=r"backbone resnet18 needs image inputs \(C, H, W\), got shape \(10,\)"):
        build_backbone("resnet18", (10,))


# ------------------------------------------------------------------------------------------ ResNet-12 regularisation
def test_dropblock_drops_about_its_rate_in_squares_and_only_in_training() -> None:
    torch.manual_seed(0)
    db = DropBlock2d(0.2, 3).train()
    x = torch.ones(8, 16, 20, 20)
    y = db(x)
    zero = (y == 0).float().mean().item()
    assert 0.15 < zero < 0.25
    assert abs(y.mean().item() - 1.0) < 1e-4  # the kept units are rescaled
    # every dropped pixel lies in a fully dropped 3x3 square
    z = (y == 0).float()
    covered = torch.zeros_like(z)
    full = torch.nn.functional.avg_pool2d(z, 3, stride=1) == 1
    for dy in range(3):
        for dx in range(3):
            covered[..., dy:dy + 18, dx:dx + 18] += full.float()
    assert bool(((z == 1) <= (covered > 0)).all())
    assert torch.equal(db.eval()(x), x)


def test_resnet12_dropblock_rate_ramps_over_its_schedule() -> None:
    net = build_backbone("resnet12", (3, 16, 16), widths=(4, 4, 4, 4), drop_rate=0.1, drop_ramp=4)
    blocks = [m for m in net.modules() if isinstance(m, DropBlock2d)]
    assert len(blocks) == 2  # after blocks 3 and 4; dropout after blocks 1 and 2
    assert net.layer1.drop_rate == 0.1 and net.layer1.dropblock is None
    net.train()
    rates = []
    for _ in range(6):
        net(torch.rand(2, 3, 16, 16))
        rates.append(blocks[0].rate)
    assert rates == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    net.eval()
    net(torch.rand(2, 3, 16, 16))
    assert net.drop_calls == 6  # evaluation does not advance the schedule


def written_out_resnet12_block(block, x):
    """A ResNet12Block's layers as TADAM / MetaOptNet write them: out of place, activation, then pool."""
    F = torch.nn.functional
    out = F.leaky_relu(block.bn1(block.conv1(x)), 0.1)
    out = F.leaky_relu(block.bn2(block.conv2(out)), 0.1)
    return F.max_pool2d(F.leaky_relu(block.bn3(block.conv3(out)) + block.downsample(x), 0.1), 2)


def test_resnet12_block_pools_before_its_last_activation_with_identical_values_and_gradients() -> None:
    from fewshot.models.backbones import ResNet12Block
    torch.manual_seed(0)
    block = ResNet12Block(3, 6).double().train()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    x[:, :, :4] = 0.0                           # blank rows: tied maxima in a window
    params = list(block.parameters())
    ours, ref = block(x), written_out_resnet12_block(block, x)
    assert ours.shape == (4, 6, 4, 4)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ torchvision names
def torchvision_resnet_keys(blocks, in_channels=3, classes=1000) -> "OrderedDict[str, tuple]":
    """The state_dict keys and shapes of torchvision's ResNet-18/34, written from its architecture: conv1
    (7x7, no bias) and bn1; per stage i of widths 64/128/256/512 and block b: conv1, bn1, conv2, bn2 (3x3,
    no bias), and in the first block of stages 2-4 downsample.0 (1x1 conv) and downsample.1 (batch norm);
    then fc. A batch norm holds weight, bias, running_mean, running_var, num_batches_tracked."""
    keys: "OrderedDict[str, tuple]" = OrderedDict()

    def bn(p, c):
        for k in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.{k}"] = (c,)
        keys[f"{p}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, in_channels, 7, 7)
    bn("bn1", 64)
    cin = 64
    for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            keys[f"{p}.conv1.weight"] = (width, cin if b == 0 else width, 3, 3)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            if b == 0 and i > 0:
                keys[f"{p}.downsample.0.weight"] = (width, cin, 1, 1)
                bn(f"{p}.downsample.1", width)
        cin = width
    keys["fc.weight"] = (classes, 512)
    keys["fc.bias"] = (classes,)
    return keys


@pytest.mark.parametrize("name,blocks,count", [("resnet18", (2, 2, 2, 2), 122), ("resnet34", (3, 4, 6, 3), 218)])
def test_resnet_state_dict_keys_and_shapes_are_torchvisions(name, blocks, count) -> None:
    net = build_backbone(name, (3, 64, 64), outputs=1000, check=False)
    got = OrderedDict((k, tuple(v.shape)) for k, v in net.state_dict().items())
    want = torchvision_resnet_keys(blocks)
    assert len(want) == count
    assert list(got.items()) == list(want.items())
    # grey images change conv1's input channels only; an encoder has no fc
    grey = build_backbone(name, (1, 28, 28), check=False)
    assert tuple(grey.state_dict()["conv1.weight"].shape) == (64, 1, 7, 7)
    assert set(grey.state_dict()) == set(want) - {"fc.weight", "fc.bias"}


def torchvision_like_file(path, blocks=(2, 2, 2, 2)) -> dict:
    """A state_dict with torchvision's ResNet key names and shapes and random values, saved to ``path``."""
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
             for k, s in torchvision_resnet_keys(blocks).items()}
    if str(path).endswith(".safetensors"):
        write_safetensors(state, path)
    else:
        torch.save(state, path)
    return state


def test_a_torchvision_state_dict_loads_as_is(tmp_path) -> None:
    state = torchvision_like_file(tmp_path / "resnet18.pth")
    net = build_backbone("resnet18", (3, 32, 32), outputs=1000)
    report = load_weights(net, tmp_path / "resnet18.pth")
    assert report.loaded == 122 and not report.missing and not report.unexpected and not report.skipped_head
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    # into an encoder (no head) and into a 5-way network (a new head), the file's fc is left out
    enc = build_backbone("resnet18", (3, 32, 32))
    r = load_weights(enc, tmp_path / "resnet18.pth")
    assert r.loaded == 120 and r.skipped_head == ["fc.bias", "fc.weight"]
    assert torch.equal(enc.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    five = build_backbone("resnet18", (3, 32, 32), outputs=5)
    fc0 = five.fc.weight.detach().clone()
    r = load_weights(five, tmp_path / "resnet18.pth")
    assert r.skipped_head == ["fc.bias", "fc.weight"] and torch.equal(five.fc.weight, fc0)
    assert r.new_head == ["fc.bias", "fc.weight"] and not r.missing
    # an encoder's file (no fc at all) into a whole network: the head stays as it was, nothing is missing
    save_weights(enc, tmp_path / "encoder.pt")
    r = load_weights(five, tmp_path / "encoder.pt")
    assert r.loaded == 120 and r.skipped_head == [] and r.new_head == ["fc.bias", "fc.weight"]
    assert torch.equal(five.fc.weight, fc0) and torch.equal(five.conv1.weight, state["conv1.weight"])
    with pytest.raises(FewshotError, match=r"2 missing keys \(fc.bias, fc.weight\)"):
        load_weights(five, tmp_path / "encoder.pt", head=None)
    # the same in a dict under "state_dict" / "model", and without the batch-norm counters (older files)
    older = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 3, "state_dict": older}, tmp_path / "wrapped.pt")
    assert load_weights(enc, tmp_path / "wrapped.pt").loaded == 100  # 120 less the 20 batch-norm counters
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, tmp_path / "dp.pt")
    assert load_weights(enc, tmp_path / "dp.pt").loaded == 120


def test_head_none_keeps_a_file_head_of_another_size_an_error(tmp_path) -> None:
    torchvision_like_file(tmp_path / "r.pt")
    five = build_backbone("resnet18", (3, 32, 32), outputs=5)
    with pytest.raises(FewshotError, match=r"2 shape mismatches \(fc.bias: file \(1000,\), model \(5,\), fc.weight"):
        load_weights(five, tmp_path / "r.pt", head=None)


def test_a_wrong_or_partial_file_is_one_line_naming_the_keys(tmp_path) -> None:
    state = torchvision_like_file(tmp_path / "full.pt")
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pt")
    net = build_backbone("resnet18", (3, 32, 32), outputs=1000)
    before = net.conv1.weight.detach().clone()
    with pytest.raises(FewshotError) as e:
        load_weights(net, tmp_path / "partial.pt")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "partial.pt") in msg
    assert "10 missing keys (layer4.1.bn1.bias, layer4.1.bn1.running_mean, layer4.1.bn1.running_var, " \
           "layer4.1.bn1.weight, ...)" in msg  # the block's 2 convs and 2 batch norms (counters excepted)
    assert "1 unexpected key (extra.weight)" in msg
    assert torch.equal(net.conv1.weight, before)  # nothing was loaded
    r = load_weights(net, tmp_path / "partial.pt", strict=False)
    assert len(r.missing) == 10 and r.unexpected == ["extra.weight"]
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    # grey images: conv1 is named with both shapes, strict or not
    grey = build_backbone("resnet18", (1, 32, 32))
    with pytest.raises(FewshotError, match=r"1 shape mismatch \(conv1.weight: file \(64, 3, 7, 7\), model \(64, 1, 7, 7\)\)"):
        load_weights(grey, tmp_path / "full.pt", strict=False)
    # a file of another network altogether (its lack of fc is a new head, not counted missing)
    save_weights(build_backbone("conv4", (1, 28, 28)), tmp_path / "conv4.pt")
    with pytest.raises(FewshotError, match=r"does not fit ResNet: 100 missing keys \(bn1.bias, .*; 28 unexpected keys \(features.0.bias"):
        load_weights(net, tmp_path / "conv4.pt")


def test_loading_never_unpickles_code(tmp_path) -> None:
    flag = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    net = build_backbone("conv4", (1, 28, 28))
    with pytest.raises(FewshotError, match=r"^refusing to load .*evil.pt: it holds pickled objects other than tensors"):
        load_weights(net, tmp_path / "evil.pt")
    assert not flag.exists()
    torch.save({"w": torch.zeros(1), "note": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(FewshotError, match="'note' is a str, not a tensor"):
        read_state_dict(tmp_path / "mixed.pt")
    with pytest.raises(FewshotError, match="^no weights file at"):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(FewshotError, match="^cannot read weights file"):
        read_state_dict(tmp_path / "junk.pt")


def test_prefix_picks_an_encoder_out_of_a_checkpoint(tmp_path) -> None:
    enc = build_backbone("conv4", (1, 28, 28))
    method_state = {"backbone." + k: v + 1 for k, v in enc.state_dict().items()}
    method_state["log_scale"] = torch.zeros(())
    torch.save({"format": "fewshot-checkpoint/1", "model": method_state}, tmp_path / "best.pt")
    fresh = build_backbone("conv4", (1, 28, 28))
    assert load_weights(fresh, tmp_path / "best.pt", prefix="backbone.").loaded == len(enc.state_dict())
    assert torch.equal(fresh.features[0].weight, enc.features[0].weight + 1)
    with pytest.raises(FewshotError, match="has no key starting with 'encoder.'"):
        load_weights(fresh, tmp_path / "best.pt", prefix="encoder.")


# ------------------------------------------------------------------------------------------ safetensors
def test_safetensors_round_trip_every_dtype(tmp_path) -> None:
    ts = {"f32": torch.randn(3, 4), "f64": torch.randn(2).double(), "f16": torch.randn(5).half(),
          "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(6).view(2, 3), "i8": torch.tensor([-3, 4], dtype=torch.int8),
          "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
          "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2]}
    write_safetensors(ts, tmp_path / "t.safetensors", {"source": "test"})
    raw = (tmp_path / "t.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:9] == b"{"
    back, meta = read_safetensors(tmp_path / "t.safetensors")
    assert meta == {"source": "test"} and set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_safetensors_weights_load_and_bad_files_are_named(tmp_path) -> None:
    state = torchvision_like_file(tmp_path / "r18.safetensors")
    net = build_backbone("resnet18", (3, 32, 32), outputs=1000)
    assert load_weights(net, tmp_path / "r18.safetensors").loaded == 122
    assert torch.equal(net.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
    save_weights(net, tmp_path / "again.safetensors")
    assert torch.equal(read_state_dict(tmp_path / "again.safetensors")["fc.weight"], state["fc.weight"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(FewshotError, match="bad.safetensors is not a safetensors file \\(header length"):
        read_safetensors(bad)
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(FewshotError, match="tensor 'w' \\(F32 \\[4\\]\\) has data offsets \\[0, 12\\]"):
        read_safetensors(bad)
    header = b'{"w":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(1))
    with pytest.raises(FewshotError, match="dtype 'Q9'"):
        read_safetensors(bad)


def test_safetensors_matches_the_safetensors_package(tmp_path) -> None:
    st = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed "
                             "(fewshot reads the format itself; this cross-checks against the package)")
    ts = {"a": torch.randn(3, 4), "b": torch.randn(2, 2).bfloat16(), "c": torch.arange(5)}
    write_safetensors(ts, tmp_path / "mine.safetensors")
    theirs = st.load_file(str(tmp_path / "mine.safetensors"))
    assert all(torch.equal(theirs[k], v) for k, v in ts.items())
    st.save_file(ts, str(tmp_path / "theirs.safetensors"))
    mine, _ = read_safetensors(tmp_path / "theirs.safetensors")
    assert all(torch.equal(mine[k], v) for k, v in ts.items())


# ------------------------------------------------------------------------------------------ your own network
class TinyNet(nn.Module):
    """A user network: conv, batch norm, a linear head."""

    def __init__(self, in_shape=(1, 28, 28), outputs=5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_shape[0], 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, outputs)

    def forward(self, x):
        return self.head(self.body(x))


def test_factories_get_the_keywords_they_accept() -> None:
    calls = []

    def both(in_shape, outputs=7):
        calls.append(("both", in_shape, outputs))
        return TinyNet(in_shape, outputs)

    def shape_only(in_shape):
        calls.append(("shape", in_shape))
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(in_shape).numel()), 8))

    def nothing():
        calls.append(("nothing",))
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(3))

    def anything(**kw):
        calls.append(("kw", sorted(kw)))
        return TinyNet(kw["in_shape"], kw.get("outputs", 16))

    assert build_backbone(both, (3, 16, 16), outputs=5)(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert build_backbone(both, (3, 16, 16)) is not None  # no outputs given: the factory's default
    assert feature_dim(build_backbone(shape_only, (1, 6, 6)), (1, 6, 6)) == 8
    assert feature_dim(build_backbone(nothing, (1, 6, 6)), (1, 6, 6)) == 3
    build_backbone(anything, (1, 8, 8))
    build_backbone(anything, (1, 8, 8), outputs=16)
    assert calls == [("both", (3, 16, 16), 5), ("both", (3, 16, 16), 7), ("shape", (1, 6, 6)), ("nothing",),
                     ("kw", ["in_shape"]), ("kw", ["in_shape", "outputs"])]
    # a class is a factory; an instance is used as it is
    assert isinstance(build_backbone(TinyNet, (1, 28, 28), outputs=4), TinyNet)
    inst = TinyNet()
    assert build_backbone(inst, (1, 28, 28), outputs=5) is inst
    # user networks have stages (their children) and a head (the last nn.Linear)
    assert list(stages(inst)) == ["body", "head"] and find_head(inst) == "head" and head_name(inst) is None
    assert feature_dim(inst, (1, 28, 28), head="head") == 16 and feature_dim(inst, (1, 28, 28)) == 5


def test_factory_by_file_and_by_module_path(tmp_path, monkeypatch) -> None:
    code = textwrap.dedent("""
        import torch
        from torch import nn
        from helper import WIDTH   # a neighbour of this file

        def make(in_shape, outputs=None):
            layers = [nn.Flatten(), nn.Linear(int(torch.Size(in_shape).numel()), WIDTH)]
            if outputs:
                layers.append(nn.Linear(WIDTH, outputs))
            return nn.Sequential(*layers)

        NOT_CALLABLE = 3

        def not_a_module():
            return "a string"
        """)
    (tmp_path / "mynets.py").write_text(code)
    (tmp_path / "helper.py").write_text("WIDTH = 12\n")
    net = build_backbone(f"{tmp_path / 'mynets.py'}:make", (1, 5, 5), outputs=3)
    assert net(torch.rand(4, 1, 5, 5)).shape == (4, 3)
    assert str(tmp_path) not in sys.path
    pkg = tmp_path / "pkgroot" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(code.replace("from helper import WIDTH", "WIDTH = 9"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    assert feature_dim(build_backbone("userpkg.nets:make", (2, 3)), (2, 3)) == 9
    with pytest.raises(FewshotError, match=r"^backbone userpkg.nets:NOT_CALLABLE: NOT_CALLABLE is a int, not a callable"):
        build_backbone("userpkg.nets:NOT_CALLABLE", (2, 3))
    with pytest.raises(FewshotError, match=r"^backbone userpkg.nets:not_a_module returned an object of type str, not a torch.nn.Module$"):
        build_backbone("userpkg.nets:not_a_module", (2, 3))


def test_bad_factories_are_one_line_errors_naming_them(tmp_path) -> None:
    def one_line(spec, match, **kw):
        with pytest.raises(FewshotError, match=match) as e:
            build_backbone(spec, kw.pop("in_shape", (1, 28, 28)), **kw)
        assert "\n" not in str(e.value)

    one_line("no_such_pkg.nets:make", r"^backbone no_such_pkg.nets:make: cannot import module no_such_pkg.nets "
             r"\(ModuleNotFoundError: No module named 'no_such_pkg'\)$")
    one_line("fewshot.models:no_factory", r"^backbone fewshot.models:no_factory: module fewshot.models has no attribute 'no_factory'$")
    missing = tmp_path / "nowhere.py"
    one_line(f"{missing}:make", rf"^backbone {missing}:make: file {missing} does not exist$")
    (tmp_path / "broken.py").write_text("raise RuntimeError('oops\\nsecond line')\n")
    one_line(f"{tmp_path / 'broken.py'}:make", r"running .*broken.py raised RuntimeError: oops$")
    one_line("fewshot.models:", r"give a factory as package.module:factory")
    one_line(lambda: 42, r"^backbone .*<lambda> returned an object of type int, not a torch.nn.Module$")
    one_line(lambda: nn.Linear(3, 4), r"^backbone .*<lambda>: a check forward pass on a zero input of shape \(1, 28, 28\) "
             r"failed \(RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    one_line(lambda: nn.Conv2d(1, 2, 3), r"maps inputs of shape \(1, 28, 28\) to outputs of shape \(2, 26, 26\) each")
    one_line(lambda in_shape: TinyNet(in_shape, 4), r"^backbone .*<lambda> gives 4 outputs per input, the method's head needs 5$",
             outputs=5)

    def raising(in_shape):
        raise ValueError("channels must be 3")

    one_line(raising, r"^backbone .*raising: its factory raised ValueError: channels must be 3$")
    one_line("resnet12", r"^backbone resnet12 takes no option 'depth' \(its options: drop_block, drop_ramp, drop_rate, "
             r"pool, widths\)$", depth=3)
    one_line(TinyNet(), r"options \(width\) need a factory, not a module", width=3)
    one_line(3.5, r"give a name, an nn.Module, a callable or 'module:factory', not a float")
    one_line("vgg16", r"^unknown backbone 'vgg16'; choose from conv4, resnet12, resnet18")


# ------------------------------------------------------------------------------------------ timm
def test_timm_backbones_when_timm_imports() -> None:
    try:
        import timm  # noqa: F401
    except Exception as e:  # timm imports torchvision, which needs a build matching this torch
        pytest.skip(f"timm cannot be imported here ({type(e).__name__}: {e})")
    enc = build_backbone("timm:resnet10t", (1, 28, 28))  # a small model, built without weights
    assert feature_dim(enc, (1, 28, 28)) == 512 and declared_head(enc) == "fc" and head_name(enc) is None
    net = build_backbone("timm:resnet10t", (3, 32, 32), outputs=5)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 5) and head_name(net) == "fc"
    assert freeze(net, "all") and [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_timm_spec_calls_create_model_without_weights(monkeypatch) -> None:
    seen = {}

    class FakeTimmModel(nn.Module):
        pretrained_cfg = {"classifier": "head"}

        def __init__(self, in_chans, num_classes):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_chans, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(6, num_classes) if num_classes else nn.Identity()

        def forward(self, x):
            return self.head(self.body(x))

    def create_model(name, pretrained=True, num_classes=1000, in_chans=3, **kw):
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        seen.update(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kw)
        return FakeTimmModel(in_chans, num_classes)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    enc = build_backbone("timm:tiny", (1, 28, 28))
    assert seen == {"name": "tiny", "pretrained": False, "num_classes": 0, "in_chans": 1}
    assert feature_dim(enc, (1, 28, 28)) == 6 and declared_head(enc) == "head" and head_name(enc) is None
    net = build_backbone("timm:tiny", (3, 28, 28), outputs=5, drop_rate=0.1)
    assert seen["num_classes"] == 5 and seen["drop_rate"] == 0.1 and head_name(net) == "head"
    assert freeze(net, "all") == ["body.0.weight", "body.0.bias"]
    with pytest.raises(FewshotError, match=r"^backbone timm:nope: timm could not build 'nope' \(RuntimeError: Unknown model \(nope\)\)$"):
        build_backbone("timm:nope", (3, 28, 28))
    monkeypatch.setitem(sys.modules, "timm", None)  # what an absent package looks like to import
    with pytest.raises(FewshotError, match=r"^backbone timm:tiny: timm could not be imported \(.*\); install fewshot\[timm\]"):
        build_backbone("timm:tiny", (3, 28, 28))


# ------------------------------------------------------------------------------------------ freezing
def test_freeze_leaves_the_right_parameters_trainable() -> None:
    net = build_backbone("resnet18", (3, 32, 32), outputs=5)
    assert list(stages(net)) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    frozen = freeze(net, "layer2")
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert set(frozen) == {n for n, _ in net.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1.", "layer2."))}
    assert set(trainable) == {n for n, _ in net.named_parameters() if n.startswith(("layer3.", "layer4.", "fc."))}
    # linear probe: everything but the head; the frozen part gets no gradient
    net = build_backbone("resnet18", (3, 32, 32), outputs=5)
    freeze(net, "all")
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert net.conv1.weight.grad is None and net.fc.weight.grad is not None
    # an encoder has no head: all of it
    enc = build_backbone("resnet12", (3, 16, 16), widths=(4, 4, 4, 4))
    assert len(freeze(enc, "all")) == n_tensors(enc) and not any(p.requires_grad for p in enc.parameters())
    conv = build_backbone("conv4", (1, 28, 28), outputs=5)
    assert freeze(conv, "block1") == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"]
    assert freeze(build_backbone("mlp", (10,)), "layer1") == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert freeze(build_backbone("wrn16-2", (3, 16, 16)), "none") == []
    assert list(stages(build_backbone("wrn16-2", (3, 16, 16)))) == ["stem", "layer1", "layer2", "layer3", "fc"]
    with pytest.raises(FewshotError, match=r"^unknown stage 'layer9' to freeze in ResNet; choose all, none or one of "
                                           r"stem, layer1, layer2, layer3, layer4, fc$"):
        freeze(net, "layer9")
    with pytest.raises(FewshotError, match="head 'nohead' is not a submodule"):
        find_head(net, "nohead")


def n_tensors(m: nn.Module) -> int:
    return sum(1 for _ in m.parameters())
