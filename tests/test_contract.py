"""The method contract (fewshot.methods.base), checked for every registered method: build from the data's
needs (``configure``), loss and backward, predict shapes, save and load to the same predictions; and
the declared hooks replace attribute probing."""
from __future__ import annotations

import io

import pytest
import torch

from fewshot import methods, tasks
from fewshot.episodes import EpisodeSampler
from fewshot.methods.base import DataInfo, Method

from conftest import make_synthetic

WAYS, SHOTS, QUERIES, BATCH = 3, 1, 2, 2
#: options that keep the larger defaults small here (sizes only; the contract is what is tested)
SMALL = {"mann": {"controller": 16, "slots": 8, "width": 4, "heads": 2, "classes": WAYS},
         "mann-lstm": {"controller": 16, "classes": WAYS},
         "ntm": {"controller": 16, "memory_size": 8, "memory_width": 4}, "lstm": {"hidden": 16}, "reptile": {"test_steps": 2}, "metalstm": {"inner_steps": 2},
         "cavia": {"context": 4}}


def episode_for(name: str):
    """``(in_shape, episode, outputs)``: a copy-task batch for sequence models, 3-way image tasks otherwise."""
    cls = methods.get(name)
    if cls.labels_sequences:
        fam = tasks.make("copy", 1, 1, batch=BATCH, seed=0)
        return fam.in_shape, fam.sample(), fam.outputs
    ds = make_synthetic(n_classes=6, per_class=6, size=16)
    return ds.image_shape, EpisodeSampler(ds, WAYS, SHOTS, QUERIES, batch=BATCH, seed=0).sample(), WAYS


@pytest.mark.parametrize("name", methods.available())
def test_every_method_keeps_the_contract(name) -> None:
    cls = methods.get(name)
    assert issubclass(cls, Method) and cls.name == name and methods.describe(name)
    in_shape, ep, outputs = episode_for(name)
    options = cls.configure(SMALL.get(name, {}), DataInfo(outputs=outputs))
    torch.manual_seed(0)
    m = methods.build(name, in_shape, **options)
    m.train()
    loss, metrics = m.loss(ep)
    assert loss.dim() == 0 and torch.isfinite(loss) and metrics
    assert all(isinstance(v, float) for v in metrics.values())
    m.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), "no gradient"
    m.eval()
    with torch.no_grad() if not cls.adapts_by_gradient else torch.enable_grad():
        out = m.predict_episode(ep)
    assert torch.isfinite(out.float()).all()
    if cls.labels_sequences:                # per-step outputs over the whole sequence (the family scores them)
        assert out.shape[0] == BATCH and out.shape[-1] == outputs
    else:
        assert out.shape == (BATCH, WAYS * QUERIES, WAYS)
    assert m.inference_mode in ("inductive", "transductive")
    # save and load: the config rebuilds the same model, the state_dict gives the same predictions
    buf = io.BytesIO()
    torch.save({"config": m.config_dict(), "model": m.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    again = methods.build(name, in_shape, **saved["config"])
    again.load_state_dict(saved["model"])
    again.eval()
    with torch.no_grad() if not cls.adapts_by_gradient else torch.enable_grad():
        assert torch.allclose(again.predict_episode(ep), out, atol=1e-5)


def test_hooks_are_declared_with_defaults() -> None:
    """What the trainer, CLI and plots ask of a method is declared on Method: nothing probes attributes."""
    for hook in ("post_train", "pair_metrics", "adapt_predict", "adapted_params", "sequence_logits",
                 "predict_episode", "extra_plots", "embed", "configure", "head_size", "make_backbone"):
        assert callable(getattr(Method, hook)) and getattr(Method, hook).__doc__, hook
    assert Method.inference_mode == "inductive"
    assert not Method.adapts_by_gradient and not Method.labels_sequences
    assert methods.get("maml").adapts_by_gradient and methods.get("ntm").labels_sequences
    # the data's needs reach a method through configure: outputs for a fixed head, attribute lengths
    assert methods.get("maml").configure({}, DataInfo(outputs=7)) == {"outputs": 7}
    assert methods.get("maml").configure({"outputs": 3}, DataInfo(outputs=7)) == {"outputs": 3}
    assert methods.get("relation").configure({}, DataInfo(outputs=5, attr_dim=12)) == {"attr_dim": 12}
    assert methods.get("protonet").configure({}, DataInfo(outputs=5)) == {}
    assert methods.get("maml").head_size({"outputs": 5}) == 5 and methods.get("protonet").head_size({}) is None


def test_a_new_method_is_one_file(tmp_path, monkeypatch) -> None:
    """Method modules are found by walking the package: a file dropped into it registers its method."""
    import importlib
    import sys

    import fewshot.methods as pkg
    src = ("from dataclasses import dataclass\nimport torch\nfrom . import register\n"
           "from .protonet import ProtoNet\n\n@register('contract-probe')\nclass Probe(ProtoNet):\n"
           "    '''A method defined in one file.'''\n")
    path = tmp_path / "contract_probe.py"
    path.write_text(src)
    monkeypatch.setattr(pkg, "__path__", list(pkg.__path__) + [str(tmp_path)])
    try:
        pkg._discover()
        assert "contract-probe" in methods.available()
        assert isinstance(methods.build("contract-probe", (1, 16, 16)), methods.get("protonet"))
    finally:
        pkg._REGISTRY.pop("contract-probe", None)
        sys.modules.pop("fewshot.methods.contract_probe", None)
        importlib.invalidate_caches()


def test_method_figure_helpers_import_nothing_of_the_project() -> None:
    import ast
    import fewshot.figures as figures
    tree = ast.parse(open(figures.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("fewshot"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("fewshot") for a in node.names)
    for name in ("pyplot", "save_figure", "tsne_real_vs_hallucinated"):
        assert callable(getattr(figures, name)) and not name.startswith("_")


def test_train_method_help_lists_that_methods_options_only(capsys) -> None:
    from fewshot.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train", "maml", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "--inner-lr" in out and "--backbone" in out and "--pretrained" in out and "--head" in out
    assert "--distance" not in out and "--fce" not in out and "--memory-size" not in out
    assert "inner-loop step size (alpha) (default: 0.4)" in out


def test_run_defaults_apply_in_the_python_api_as_on_the_command_line(tmp_path) -> None:
    """fs.fit(RunConfig(method="maml")) trains with maml's literature settings (5-way, meta-batch 32, no
    schedule), not RunConfig's protonet ones (60-way, batch 1); what the user sets stays."""
    import fewshot as fs
    from fewshot.run import apply_run_defaults
    ds = make_synthetic(n_classes=12, per_class=10, size=16)
    cfg = fs.RunConfig(method="maml", queries=2, val_fraction=0.0, split="none", device="cpu",
                       options={"vectorize": "loop", "workers": 1},
                       train=fs.TrainConfig(episodes=1, val_every=0))
    run = fs.fit(cfg, tmp_path / "m", progress=False, dataset=ds)
    assert (run.config.ways, run.config.batch, run.config.queries) == (5, 32, 2)
    assert run.config.train.schedule == "none" and run.method.config.outputs == 5
    kept = fs.RunConfig(method="maml", ways=60, batch=1)
    kept.train.schedule = "step"
    apply_run_defaults(kept)
    assert (kept.ways, kept.batch, kept.shots, kept.train.schedule) == (60, 1, 1, "step")
    recipe = fs.RunConfig.from_dict({"method": "maml"})        # a recipe is complete as written
    apply_run_defaults(recipe)
    assert (recipe.ways, recipe.batch) == (60, 1)
