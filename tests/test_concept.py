"""DEML, learning in concept space (fewshot.concept): lambda = 0 is the method alone, lambda > 0 trains G through
the concept discriminator (for MAML: the body of the meta-parameters network, not its head), exact resume
with the discriminator and its external sampler, and a trained run that reloads and evaluates without the
external data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_image_folder, make_synthetic
from fewshot import checkpoint, concept
from fewshot.cli import main
from fewshot.config import RunConfig
from fewshot.data.images import to_float
from fewshot.run import build_method, fit, load_run
from fewshot.train import TrainConfig


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> Path:
    """The external labelled set: 6 classes x 6 grey 16x16 PNGs (distinct stroke patterns)."""
    return make_image_folder(tmp_path_factory.mktemp("concept") / "external", n_classes=6, per_class=6, size=16)


@pytest.fixture(scope="module")
def ds16():
    return make_synthetic(n_classes=12, per_class=10, size=16, seed=2)


def _cfg(method: str = "protonet", steps: int = 8, **kw) -> RunConfig:
    opts = {"hidden": 8} if method == "protonet" else {"hidden": 8, "inner_lr": 0.4}
    return RunConfig(method=method, options=opts, data="(in memory)", split="fraction:0.25", val_fraction=0.25,
                     ways=3, shots=1, queries=2, batch=2, size=16, val_ways=3, val_queries=2, test_ways=3,
                     test_queries=2, device="cpu", precision="fp32", channels_last=False, seed=5,
                     train=TrainConfig(episodes=steps, val_every=4, val_episodes=10, ckpt_every=100, log_every=1,
                                       lr=1e-3, schedule="none"), **kw)


def _model(out: Path, which: str = "last") -> dict:
    return checkpoint.load(out / "checkpoints" / f"{which}.pt")["model"]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_lambda_zero_is_exactly_the_method_alone(ds16, external, tmp_path: Path) -> None:
    fit(_cfg(), tmp_path / "plain", progress=False, dataset=ds16)
    fit(_cfg(concept_data=str(external), concept_weight=0.0), tmp_path / "zero", progress=False, dataset=ds16)
    for which in ("last", "best"):
        plain, zero = _model(tmp_path / "plain", which), _model(tmp_path / "zero", which)
        assert any(k.startswith(concept.PREFIX) for k in zero)      # D is there, it just takes no part
        assert _equal(plain, concept.method_state(zero))


def test_lambda_trains_g_through_the_discriminator(ds16, external, tmp_path: Path) -> None:
    cfg = _cfg(steps=60, concept_data=str(external), concept_weight=1.0, concept_batch=16)
    cfg.train.lr, cfg.train.val_every = 1e-2, 0
    torch.manual_seed(cfg.seed)
    fresh = build_method(cfg, (1, 16, 16))                # the wrapper as training starts (same seed, same weights)
    fit(cfg, tmp_path / "deml", progress=False, dataset=ds16)
    plain = _cfg(steps=60)
    plain.train.lr, plain.train.val_every = 1e-2, 0
    fit(plain, tmp_path / "plain", progress=False, dataset=ds16)
    trained = _model(tmp_path / "deml")
    ref = _model(tmp_path / "plain")
    g = [k for k in ref if k.startswith("backbone.") and k.endswith("weight")]
    assert g and all(not torch.equal(trained[k], ref[k]) for k in g)     # G moved by L_D

    # D's cross-entropy on the whole external set falls (the trained G and D against those at the start)
    ext = concept.load_external(str(external), 16, None, (1, 16, 16))
    x, y = to_float(ext.data), ext.labels()

    def external_ce(model) -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model.concept(model.inner.embed(x)), y))
    before = external_ce(fresh)
    fresh.load_state_dict(trained)                        # the checkpoint's state is the wrapper's
    after = external_ce(fresh)
    assert after < 0.5 * before, (before, after)
    rows = [json.loads(l) for l in (tmp_path / "deml" / "metrics.jsonl").read_text().splitlines()]
    ce = [r["concept_ce"] for r in rows if r["kind"] == "train"]
    assert len(ce) == 60 and sum(ce[-10:]) < 0.5 * sum(ce[:10])


def test_maml_discriminator_reaches_the_body_not_the_head(ds16, external, tmp_path: Path) -> None:
    """One outer step: with lambda > 0 the body of the meta-parameters network moves differently, the head
    (which L_D does not read) exactly as without D."""
    fit(_cfg("maml", steps=1), tmp_path / "plain", progress=False, dataset=ds16)
    fit(_cfg("maml", steps=1, concept_data=str(external), concept_weight=1.0), tmp_path / "deml", progress=False,
        dataset=ds16)
    plain, deml = _model(tmp_path / "plain"), _model(tmp_path / "deml")
    head = [k for k in plain if k.startswith("net.head.")]
    convs = [k for k in plain if k.startswith("net.convs.")]
    assert head and convs
    assert all(torch.equal(plain[k], deml[k]) for k in head)
    # (Adam's first step is about lr * sign(gradient): a body tensor whose gradient signs L_D leaves alone may
    # move equally; every convolution of G moves differently)
    assert all(not torch.equal(plain[k], deml[k]) for k in convs)


def test_resume_is_bit_identical_with_the_discriminator(ds16, external, tmp_path: Path) -> None:
    cfg = dict(concept_data=str(external), concept_weight=0.5, concept_batch=8)
    fit(_cfg(**cfg), tmp_path / "full", progress=False, dataset=ds16)

    def stop(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(**cfg), tmp_path / "part", progress=False, dataset=ds16, on_step=stop)
    fit(_cfg(**cfg), tmp_path / "part", resume=True, progress=False, dataset=ds16)
    for which in ("last", "best"):
        a = checkpoint.load(tmp_path / "full" / "checkpoints" / f"{which}.pt")
        b = checkpoint.load(tmp_path / "part" / "checkpoints" / f"{which}.pt")
        assert a["step"] == b["step"] == (8 if which == "last" else a["step"])
        assert _equal(a["model"], b["model"])               # D's weights and the external sampler's state too
        assert _equal(a["optimizer"]["state"], b["optimizer"]["state"])
    assert _model(tmp_path / "full")["concept._extra_state"]["drawn"] == 8

    def rows(d):
        return [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
                for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "full") == rows(tmp_path / "part")


def test_a_concept_run_evaluates_without_the_external_data(external, image_root, tmp_path: Path, capsys) -> None:
    ext = Path(shutil.copytree(external, tmp_path / "ext"))
    out = tmp_path / "run"
    assert main(["train", "protonet", "--data", str(image_root), "--out", str(out), "--size", "16", "--ways", "3",
                 "--shots", "1", "--queries", "2", "--episodes", "3", "--val-every", "0", "--hidden", "8",
                 "--split", "fraction:0.25", "--test-ways", "3", "--test-queries", "2", "--test-episodes", "5",
                 "--concept-data", str(ext), "--concept-weight", "0.3", "--no-progress"]) == 0
    shutil.rmtree(ext)                                    # the external set is gone: eval must not need it
    capsys.readouterr()
    assert main(["eval", str(out), "--episodes", "5", "--no-progress"]) == 0
    assert "5 episodes, seed 0, 3-way 1-shot" in capsys.readouterr().out
    run = load_run(out)
    assert type(run.method).__name__ == "ProtoNet" and run.config.concept_data == str(ext)
    state = run.method.state_dict()
    assert _equal(state, concept.method_state(_model(out, "best")))


def test_concept_classes_picks_a_seeded_subset(external) -> None:
    ds = concept.load_external(str(external), 16, None, (1, 16, 16), classes=3, seed=1)
    again = concept.load_external(str(external), 16, None, (1, 16, 16), classes=3, seed=1)
    whole = concept.load_external(str(external), 16, None, (1, 16, 16))
    assert len(ds) == 3 and ds.names == again.names and set(ds.names) < set(whole.names)
    cfg = _cfg(concept_data=str(external), concept_classes=3)
    assert build_method(cfg, (1, 16, 16)).concept.classifier.out_features == 3
