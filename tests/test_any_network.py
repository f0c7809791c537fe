"""Any network for every method (issue 14): a module defined only here trains with metric and
gradient-based methods through the Python API, its second-order meta-gradient is exact with a batch-norm
layer, batch-norm modes, ANIL/BOIL heads, CAVIA's context, pretrained weights and freezing through
``build``/``fit``, and bad ``--backbone`` factories on the command line."""
from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

import fewshot as fs
from fewshot.episodes import Episode, EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.models.functional import FunctionalNet
from fewshot.models.weights import save_weights

from conftest import make_nuisance


class CornerNet(nn.Module):
    """A small network of this file only: conv-BN-ReLU, a 2x2 pooled map, a linear embedding, and a linear
    head when ``outputs`` is given (a gradient-based method's whole network)."""

    def __init__(self, in_shape=(1, 12, 12), outputs=None, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(width * (in_shape[1] // 3) * (in_shape[2] // 3), 32),
                                   nn.ReLU())
        self.classifier = nn.Linear(32, outputs) if outputs else nn.Identity()

    def forward(self, x):
        return self.classifier(self.embed(self.stem(x)))


def nuisance_splits():
    ds = make_nuisance(n_classes=40, per_class=20)
    return ds.split_fraction(test=0.25, seed=0)


# (method, options, training steps): each through fs.fit with a module instance
LEARNERS = [
    ("protonet", {}, {"ways": 10, "shots": 1, "queries": 5}, {"episodes": 150, "lr": 3e-3}),
    ("maml", {"inner_lr": 0.1, "inner_steps": 3, "vectorize": "loop", "workers": 1},
     {"ways": 5, "shots": 1, "queries": 5, "batch": 4}, {"episodes": 120, "lr": 3e-3}),
    ("anil", {"inner_lr": 0.1, "inner_steps": 3, "vectorize": "vmap"},
     {"ways": 5, "shots": 1, "queries": 5, "batch": 4}, {"episodes": 120, "lr": 3e-3}),
    ("reptile", {"inner_steps": 5, "inner_lr": 0.05, "inner_rule": "sgd", "test_steps": 30, "workers": 1},
     {"ways": 5, "shots": 1, "queries": 5, "batch": 4}, {"episodes": 150, "lr": 1.0}),
]


@pytest.mark.parametrize("method,options,episodes,train", LEARNERS, ids=[m[0] for m in LEARNERS])
def test_a_module_of_this_file_learns_with_every_family(tmp_path, method, options, episodes, train) -> None:
    """Trained through ``fs.fit(cfg, out, backbone=module)``, the module beats chance clearly on held-out
    classes where raw pixels (noise everywhere but a 4x4 corner) do not; the run records the class and
    reloads with a module of it."""
    train_ds, test_ds = nuisance_splits()
    outputs = 5 if method != "protonet" else None
    torch.manual_seed(0)
    module = CornerNet(outputs=outputs)
    cfg = fs.RunConfig(method=method, options=dict(options), data="nuisance", split="none", val_fraction=0.0,
                       device="cpu", precision="fp32", **episodes,
                       train=fs.TrainConfig(val_every=0, schedule="none", log_every=50, **train))
    run = fs.fit(cfg, tmp_path / method, progress=False, dataset=train_ds, backbone=module)
    assert run.config.options["backbone"] == f"instance of {__name__}.CornerNet"
    sampler = EpisodeSampler(test_ds, 5, 1, 5, seed=0)
    res = evaluate(run.method, sampler, 60, progress=False)
    print(f"{method} on CornerNet: 5-way 1-shot held-out {res.mean:.1f} ± {res.ci95:.1f}%")
    assert res.mean > 20 + 15, res           # chance is 20 %
    # the run names what it needs; with a module of that class it reloads to the same predictions
    with pytest.raises(FewshotError, match="CornerNet.*pass one of that class again"):
        fs.load_run(tmp_path / method)
    again = fs.load_run(tmp_path / method, backbone=CornerNet(outputs=outputs))
    ep = EpisodeSampler(test_ds, 5, 1, 5, seed=1).sample(2)
    assert torch.allclose(again.method.predict(ep.support_x, ep.support_y, ep.query_x, 5),
                          run.method.predict(ep.support_x, ep.support_y, ep.query_x, 5), atol=1e-5)


def _episode(B=2, N=3, K=2, Q=2, size=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(B, N * K, 1, size, size, generator=g, dtype=dtype)
    qx = torch.rand(B, N * Q, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(N).repeat(K).expand(B, -1).contiguous()
    qy = torch.arange(N).repeat(Q).expand(B, -1).contiguous()
    return Episode(sx, sy, qx, qy, N, K, Q)


class BNNet(nn.Module):
    """Conv, batch norm, tanh (smooth, for finite differences), mean pool, linear head."""

    def __init__(self, outputs=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, outputs)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_second_order_meta_gradient_of_a_module_with_batch_norm_matches_finite_differences(vectorize) -> None:
    torch.manual_seed(0)
    m = fs.methods.build("maml", (1, 6, 6), backbone=BNNet(), outputs=3, inner_steps=2, inner_lr=0.3,
                         vectorize=vectorize, workers=1).double()
    ep = _episode()
    loss, _ = m.loss(ep)
    m.zero_grad()
    loss.backward()
    params = dict(m.named_parameters())

    def outer(p):
        return float(m.map_tasks("task_objective", {k: v.detach() for k, v in p.items()}, ep.support_x,
                                 ep.support_y, ep.query_x, ep.query_y)[0].detach().mean())

    base = {k.removeprefix("net."): v.detach().clone() for k, v in params.items() if k.startswith("net.")}
    eps = 1e-6
    checked = 0
    for name in ("net.body.bn.weight", "net.body.conv.weight", "net.body.fc.bias"):
        g = params[name].grad
        key = name.removeprefix("net.")
        for idx in [(0,), (1,)] if g.dim() == 1 else [(0, 0, 1, 1), (2, 0, 0, 2)]:
            plus, minus = copy.deepcopy(base), copy.deepcopy(base)
            plus[key][idx] += eps
            minus[key][idx] -= eps
            fd = (outer(plus) - outer(minus)) / (2 * eps)
            assert g[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, idx)
            checked += 1
    assert checked == 6
    # first order differs (the batch-norm statistics and the inner steps carry second-order terms)
    fo = fs.methods.build("maml", (1, 6, 6), backbone=copy.deepcopy(m.net.body).float(), outputs=3, inner_steps=2,
                          inner_lr=0.3, first_order=True, vectorize=vectorize, workers=1).double()
    l2, _ = fo.loss(ep)
    fo.zero_grad()
    l2.backward()
    assert not torch.allclose(dict(fo.named_parameters())["net.body.bn.weight"].grad,
                              params["net.body.bn.weight"].grad)


def test_batch_norm_modes_on_any_module() -> None:
    ep = _episode(dtype=torch.float32)
    # transductive: batch statistics in evaluation too, the module's own running averages untouched
    m = fs.methods.build("maml", (1, 6, 6), backbone=BNNet(), outputs=3, vectorize="loop", workers=1)
    bn = m.net.body.bn
    before = bn.running_mean.clone()
    m.loss(ep)[0].backward()
    m.eval()
    out1 = m.predict(ep.support_x, ep.support_y, ep.query_x, 3)
    out2 = m.predict(ep.support_x, ep.support_y, ep.query_x[:, :1], 3)     # one query alone: other statistics
    assert torch.equal(bn.running_mean, before) and bn.training
    assert not torch.allclose(out1[:, :1], out2, atol=1e-4)
    assert m.inference_mode == "transductive"
    # running: per-step statistics folded in during training; each query classified on its own
    r = fs.methods.build("maml", (1, 6, 6), backbone=BNNet(), outputs=3, bn="running", inner_steps=2,
                         vectorize="vmap")
    r.loss(ep)[0].backward()
    assert not torch.equal(r.net.step_mean0[0], torch.zeros(4)) and not torch.equal(r.net.step_mean0[2],
                                                                                    torch.zeros(4))
    r.eval()
    a = r.predict(ep.support_x, ep.support_y, ep.query_x, 3)
    b = r.predict(ep.support_x, ep.support_y, ep.query_x[:, :1], 3)
    assert torch.allclose(a[:, :1], b, atol=1e-5) and r.inference_mode == "inductive"
    # none: refused for a module that has batch-norm layers, accepted without them
    with pytest.raises(FewshotError, match="batch-norm layers.*transductive or running"):
        fs.methods.build("maml", (1, 6, 6), backbone=BNNet(), outputs=3, bn="none")
    plain = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    fs.methods.build("maml", (1, 6, 6), backbone=plain, outputs=3, bn="none").loss(ep)[0].backward()
    # bf16 autocast (fp32 affine weights, bf16 activations) under vmap, as --precision bf16 runs it
    v = fs.methods.build("maml", (1, 6, 6), backbone=BNNet(), outputs=3, vectorize="vmap")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = v.loss(ep)
    loss.backward()
    assert torch.isfinite(v.net.body.bn.weight.grad).all()


def test_anil_boil_heads_and_cavia_context_on_any_module() -> None:
    ep = _episode(dtype=torch.float32)
    anil = fs.methods.build("anil", (1, 6, 6), backbone=BNNet(), outputs=3)
    assert anil.adapt_keys == ["body.fc.weight", "body.fc.bias"]
    boil = fs.methods.build("boil", (1, 6, 6), backbone=BNNet(), outputs=3)
    assert "body.fc.weight" not in boil.adapt_keys and "body.conv.weight" in boil.adapt_keys
    # --head names another submodule: the conv is the "head" now
    other = fs.methods.build("anil", (1, 6, 6), backbone=BNNet(), outputs=3, head="conv")
    assert other.adapt_keys == ["body.conv.weight", "body.conv.bias"]
    with pytest.raises(FewshotError, match="head 'nope' is not a submodule of BNNet"):
        fs.methods.build("anil", (1, 6, 6), backbone=BNNet(), outputs=3, head="nope")
    # CAVIA: the context scales and shifts the head's input; it alone adapts, from zero (FiLM = identity)
    cavia = fs.methods.build("cavia", (1, 6, 6), backbone=BNNet(), outputs=3, context=5, vectorize="loop",
                             workers=1)
    assert cavia.adapt_keys == [] and cavia.net.film.out_features == 2 * 4
    x = ep.support_x[0]
    plain, _ = cavia.net(x)
    zero, _ = cavia.net(x, context=torch.zeros(5))
    assert torch.allclose(plain, zero)
    moved, _ = cavia.net(x, context=torch.ones(5))
    assert not torch.allclose(plain, moved)
    loss, _ = cavia.loss(ep)
    loss.backward()
    assert cavia.net.film.weight.grad.abs().sum() > 0
    with pytest.raises(FewshotError, match="no nn.Linear head for CAVIA"):
        fs.methods.build("cavia", (1, 6, 6), backbone=nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1),
                                                                     nn.Flatten()), outputs=3)


def test_backbone_specs_pretrained_weights_and_freezing(tmp_path) -> None:
    """A name and a spec string go into the config; a pretrained file loads into the built network (a
    wrong one is one line naming the missing keys unless pretrained_strict is false); freeze stops the
    gradients of everything but the head."""
    p = fs.methods.build("protonet", (1, 12, 12), backbone="resnet20")
    assert p.config.backbone == "resnet20" and type(p.backbone).__name__ == "CifarResNet"
    enc = CornerNet()
    with torch.no_grad():
        enc.embed[1].bias.fill_(0.25)
    path = tmp_path / "corner.safetensors"
    save_weights(enc, path)
    spec = f"{__name__}:CornerNet"
    m = fs.methods.build("protonet", (1, 12, 12), backbone=spec, pretrained=str(path), freeze="all")
    assert torch.equal(m.backbone.embed[1].bias, torch.full((32,), 0.25))
    assert not any(p.requires_grad for p in m.backbone.parameters())
    # a whole network: freeze all leaves the head (here the last nn.Linear) trainable; the encoder file
    # loads into it, its head keeps its initialisation
    g = fs.methods.build("maml", (1, 12, 12), backbone=spec, outputs=5, pretrained=str(path), freeze="all",
                         pretrained_strict=False)
    trainable = [n for n, q in g.net.named_parameters() if q.requires_grad]
    assert trainable == ["body.classifier.weight", "body.classifier.bias"]
    assert g.adapt_keys == trainable
    assert torch.equal(g.net.body.embed[1].bias, torch.full((32,), 0.25))
    wrong = tmp_path / "wrong.pt"
    torch.save({"stem.0.weight": torch.zeros(16, 1, 3, 3)}, wrong)
    with pytest.raises(FewshotError, match=r"wrong.pt does not fit CornerNet: .*missing keys \(embed.1.bias"):
        fs.methods.build("protonet", (1, 12, 12), backbone=spec, pretrained=str(wrong))
    loose = fs.methods.build("protonet", (1, 12, 12), backbone=spec, pretrained=str(wrong),
                             pretrained_strict=False)
    assert torch.equal(loose.backbone.stem[0].weight, torch.zeros(16, 1, 3, 3))


def test_methods_without_an_encoder_refuse_a_backbone() -> None:
    with pytest.raises(FewshotError, match="method 'ntm' builds its own networks"):
        fs.methods.build("ntm", (9,), backbone=CornerNet())


# ------------------------------------------------------------------------------------------ the command line
FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def good(in_shape, outputs=None):
        layers = [nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], 16), nn.ReLU()]
        return nn.Sequential(*layers, *( [nn.Linear(16, outputs)] if outputs else []))

    def not_a_module(in_shape):
        return "a string"

    def wrong_size(in_shape, outputs=None):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], 7))

    def image_map(in_shape):
        return nn.Conv2d(in_shape[0], 4, 3)
""")


def _train(capsys, *args):
    from fewshot.cli import main
    rc = main(["train", *args, "--no-progress"])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("spec,needle", [
    ("no_such_package_xyz.nets:make", "backbone no_such_package_xyz.nets:make: cannot import module no_such_package_xyz.nets"),
    ("{file}:absent", "has no attribute 'absent'"),
    ("{file}:not_a_module", "returned an object of type str, not a torch.nn.Module"),
    ("{file}:wrong_size", "gives 7 outputs per input, the method's head needs 5"),
    ("{file}:image_map", "it must give one vector per input"),
    ("{dir}/missing.py:good", "missing.py does not exist"),
])
def test_bad_backbone_factories_are_one_line_errors_and_leave_no_run(tmp_path, capsys, image_root, spec,
                                                                    needle) -> None:
    f = tmp_path / "nets.py"
    f.write_text(FACTORIES)
    spec = spec.format(file=f, dir=tmp_path)
    method = "maml" if "wrong_size" in spec else "protonet"
    out = tmp_path / "run"
    rc, cap = _train(capsys, method, "--data", str(image_root), "--size", "16", "--episodes", "2", "--backbone",
                     spec, "--out", str(out))
    assert rc == 2 and cap.err.startswith("fewshot: error: ") and needle in cap.err
    assert cap.err.count("\n") == 1 and "Traceback" not in cap.err
    assert not out.exists()


def test_a_file_factory_trains_from_the_command_line_and_records_it(tmp_path, capsys, image_root) -> None:
    f = tmp_path / "nets.py"
    f.write_text(FACTORIES)
    out = tmp_path / "run"
    rc, cap = _train(capsys, "maml", "--data", str(image_root), "--size", "16", "--episodes", "2", "--batch", "2",
                     "--queries", "3", "--backbone", f"{f}:good", "--out", str(out), "--no-eval", "--workers", "1")
    assert rc == 0, cap.err
    run = fs.load_run(out)
    assert run.config.options["backbone"] == f"{f}:good"
    assert isinstance(run.method.net, FunctionalNet) and run.method.net.head_prefix == "body.3."
    from fewshot.cli import main
    assert main(["eval", str(out), "--ways", "3", "--episodes", "5", "--no-progress"]) == 0


def test_pretrained_and_freeze_from_the_command_line(tmp_path, capsys, image_root) -> None:
    """--pretrained loads into the backbone before training and is recorded; --freeze all keeps it fixed;
    a file that does not fit is one line naming the missing keys, exit 2, and no run folder."""
    from fewshot.models.backbones import build_backbone
    enc = build_backbone("conv4", (1, 16, 16), hidden=8)
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(0.5)
    path = tmp_path / "enc.pt"
    save_weights(enc, path)
    out = tmp_path / "run"
    rc, cap = _train(capsys, "protonet", "--data", str(image_root), "--size", "16", "--ways", "3", "--queries", "2",
                     "--episodes", "3", "--hidden", "8", "--backbone", "conv4", "--pretrained", str(path),
                     "--freeze", "block3", "--out", str(out), "--no-eval")
    assert rc == 0, cap.err
    run = fs.load_run(out)
    assert run.config.options["pretrained"] == str(path) and run.config.options["freeze"] == "block3"
    feats = run.method.backbone.features
    assert all(torch.all(p == 0.5) for i in range(12) for p in feats[i].parameters())   # loaded, kept fixed
    assert not torch.all(feats[12].weight == 0.5)                                   # block4 trained
    path.unlink()                       # the checkpoint holds the weights: the file is not needed to load
    assert torch.equal(fs.load_run(out).method.backbone.features[0].weight, run.method.backbone.features[0].weight)
    rc, cap = _train(capsys, "protonet", "--data", str(image_root), "--size", "16", "--episodes", "2",
                     "--freeze", "all", "--out", str(tmp_path / "frozen"))
    assert rc == 2 and "protonet has nothing to train: every parameter is frozen" in cap.err
    assert cap.err.count("\n") == 1 and not (tmp_path / "frozen").exists()
    wrong = tmp_path / "wrong.safetensors"
    save_weights(nn.Sequential(nn.Linear(2, 2)), wrong)
    rc, cap = _train(capsys, "protonet", "--data", str(image_root), "--size", "16", "--episodes", "2",
                     "--pretrained", str(wrong), "--out", str(tmp_path / "bad"))
    assert rc == 2 and cap.err.startswith("fewshot: error: weights file") and "missing keys (features.0" in cap.err
    assert cap.err.count("\n") == 1 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_second_order_meta_gradient_through_resnet12_blocks_equals_the_written_out_blocks(vectorize,
                                                                                         monkeypatch) -> None:
    """ResNet12Block runs its first two LeakyReLUs in place and pools before the third: the second-order
    meta-gradient (under vmap too) is that of the block as written out, out of place and pool last."""
    from fewshot.models.backbones import ResNet12, ResNet12Block
    from test_backbones import written_out_resnet12_block
    torch.manual_seed(0)
    net = ResNet12((1, 16, 16), outputs=3, widths=(3, 3, 3, 3))
    m = fs.methods.build("maml", (1, 16, 16), backbone=net, outputs=3, inner_steps=1, inner_lr=0.3,
                         vectorize=vectorize, workers=1).double()
    ep = _episode(size=16)

    def meta_grad():
        m.zero_grad()
        m.loss(ep)[0].backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    ours = meta_grad()

    monkeypatch.setattr(ResNet12Block, "forward", written_out_resnet12_block)
    ref = meta_grad()
    assert ours.keys() == ref.keys()
    for k in ours:
        assert torch.allclose(ours[k], ref[k], rtol=1e-9, atol=1e-12), k
