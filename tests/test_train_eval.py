"""The training loop (files written, exact resume, schedules) and the evaluation protocol."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import adam_steps, make_synthetic
from fewshot import checkpoint, methods
from fewshot.config import RunConfig
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import EVAL_BATCH, evaluate, mean_ci
from fewshot.run import fit, load_run
from fewshot.train import TrainConfig, train


@pytest.fixture
def ds16():
    """12 classes x 10 images of 1x16x16 (conv4 needs at least 16 pixels a side)."""
    return make_synthetic(n_classes=12, per_class=10, size=16, seed=2)


def _run_config(steps: int = 12, **train_kw) -> RunConfig:
    tc = dict(episodes=steps, val_every=4, val_episodes=25, ckpt_every=100, log_every=1, lr=1e-3)
    tc.update(train_kw)
    return RunConfig(method="protonet", options={"hidden": 16}, data="(in memory)", split="fraction:0.25",
                     val_fraction=0.25, augment={"affine": {"degrees": 15, "translate": 0.1}},
                     ways=5, shots=1, queries=2, batch=2, val_ways=5, val_shots=1, val_queries=2,
                     device="cpu", precision="fp32", channels_last=False, seed=3, train=TrainConfig(**tc))


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ config
def test_train_config_validation() -> None:
    TrainConfig().check()
    with pytest.raises(FewshotError, match="unknown schedule 'cosine'"):
        TrainConfig(schedule="cosine").check()
    with pytest.raises(FewshotError, match="episodes must be at least 1"):
        TrainConfig(episodes=0).check()


def test_run_config_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = _run_config()
    cfg.save(tmp_path / "c.yaml")
    back = RunConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    # flat training keys are accepted in recipes
    assert RunConfig.from_dict({"episodes": 7, "ways": 3}).train.episodes == 7
    with pytest.raises(FewshotError, match="unknown config key 'wayz'"):
        RunConfig.from_dict({"wayz": 3})
    with pytest.raises(FewshotError, match="unknown training option 'lrr'"):
        RunConfig.from_dict({"train": {"lrr": 3}})
    with pytest.raises(FewshotError, match="no such config file"):
        RunConfig.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("ways: [1,\n")
    with pytest.raises(FewshotError, match="cannot parse"):
        RunConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(FewshotError, match="must hold a mapping"):
        RunConfig.load(tmp_path / "list.yaml")


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads_and_names_a_method(recipe: Path) -> None:
    """Each shipped recipe parses, names a registered method and gives it only options it has."""
    cfg = RunConfig.load(recipe)
    known = {f.name for f in dataclasses.fields(methods.get(cfg.method).Config)}
    assert set(cfg.options) <= known, set(cfg.options) - known
    assert cfg.tta >= 0 and cfg.train.episodes > 0


# ------------------------------------------------------------------------------------------ training
def test_fit_writes_a_run_directory(ds16, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = fit(_run_config(steps=6), out, progress=False, dataset=ds16)
    for f in ("config.yaml", "metrics.csv", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt",
              "classes_train.txt", "classes_val.txt", "classes_test.txt"):
        assert (out / f).is_file(), f
    parts = [(out / f"classes_{p}.txt").read_text().split() for p in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == ds16.names                         # every class exactly once
    assert len(parts[2]) == 3 and len(parts[1]) == 2 and len(parts[0]) == 7
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "protonet" and cfg["train"]["episodes"] == 6 and cfg["precision"] == "fp32"
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in rows if r["kind"] == "val"] == [4, 6]
    jl = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(jl) == len(rows) and all(math.isfinite(r["loss"]) for r in jl if r["kind"] == "train")
    last = checkpoint.load(out / "checkpoints" / "last.pt")
    assert last["step"] == 6 and last["method"] == "protonet" and last["in_shape"] == [1, 16, 16]
    assert last["preprocess"]["size"] == [16, 16] and last["kind"] == "last"
    assert run.checkpoint["kind"] == "best" and run.method.in_shape == (1, 16, 16)
    with pytest.raises(FewshotError, match="already holds a run"):
        fit(_run_config(steps=6), out, progress=False, dataset=ds16)


def test_resume_equals_uninterrupted_training(ds16, tmp_path: Path) -> None:
    full = tmp_path / "full"
    fit(_run_config(), full, progress=False, dataset=ds16)

    part = tmp_path / "part"

    def stop(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_run_config(), part, progress=False, dataset=ds16, on_step=stop)
    saved = checkpoint.load(part / "checkpoints" / "last.pt")
    assert saved["step"] == 5                                   # Ctrl-C saved the state of step 5
    fit(_run_config(), part, resume=True, progress=False, dataset=ds16)

    for which in ("last", "best"):
        a = checkpoint.load(full / "checkpoints" / f"{which}.pt")
        b = checkpoint.load(part / "checkpoints" / f"{which}.pt")
        assert a["step"] == b["step"] and a["best_val"] == b["best_val"]
        _states_equal(a["model"], b["model"])
        for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            _states_equal(pa, pb)
        assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    assert checkpoint.load(part / "checkpoints" / "last.pt")["step"] == 12

    def rows(d):
        return [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
                for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(full) == rows(part)                             # the same losses, lrs and val scores


def test_fp16_trains_with_a_gradient_scaler_that_resumes_exactly(ds16, tmp_path: Path) -> None:
    """fp16 autocast scales the loss (dynamic loss scaling); the scaler's state is in every checkpoint, so a
    stopped fp16 run resumes to the weights of an uninterrupted one."""
    def cfg():
        c = _run_config(steps=8)
        c.precision = "fp16"
        return c
    full = fit(cfg(), tmp_path / "full", progress=False, dataset=ds16)
    assert full.precision == "fp16"
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt")
    assert a["train_config"]["precision"] == "fp16" and a["grad_scaler"]["scale"] > 1
    assert yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["precision"] == "fp16"

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(), tmp_path / "part", progress=False, dataset=ds16, on_step=stop)
    fit(cfg(), tmp_path / "part", resume=True, progress=False, dataset=ds16)
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")
    _states_equal(a["model"], b["model"])
    assert a["grad_scaler"] == b["grad_scaler"]


def test_compiled_training_step_matches_eager_and_is_refused_where_it_cannot_apply(ds16, tmp_path: Path) -> None:
    """--compile BACKEND runs the method's loss through torch.compile (aot_eager here: the tracing and
    autograd of inductor without its C++ compile time); the losses and weights follow the eager run."""
    runs = {}
    for how in ("off", "aot_eager"):
        fit(_run_config(steps=3, compile=how), tmp_path / how, progress=False, dataset=ds16)
        runs[how] = checkpoint.load(tmp_path / how / "checkpoints" / "last.pt")["model"]
    for k in runs["off"]:
        assert torch.allclose(runs["off"][k].float(), runs["aot_eager"][k].float(), atol=1e-4), k
    cfg = _run_config(steps=2, compile="aot_eager")
    cfg.method, cfg.options = "maml", {"hidden": 8}
    with pytest.raises(FewshotError, match="cannot be compiled"):
        fit(cfg, tmp_path / "maml", progress=False, dataset=ds16)
    with pytest.raises(FewshotError, match="unknown torch.compile backend"):
        fit(_run_config(steps=2, compile="nosuch"), tmp_path / "bad", progress=False, dataset=ds16)


def test_resume_errors(ds16, tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="nothing to resume"):
        fit(_run_config(steps=4), tmp_path / "fresh", resume=True, progress=False, dataset=ds16)
    out = tmp_path / "run"
    fit(_run_config(steps=4), out, progress=False, dataset=ds16)
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    ck["method"] = "maml"
    torch.save(ck, out / "checkpoints" / "last.pt")
    with pytest.raises(FewshotError, match="holds a 'maml' run, not 'protonet'"):
        fit(_run_config(steps=8), out, resume=True, progress=False, dataset=ds16)


def _mlp_setup(ds):
    train_ds, val_ds = ds.split_fraction(test=0.4, seed=0)
    torch.manual_seed(0)
    m = methods.build("protonet", ds.image_shape, backbone="mlp", mlp_hidden=[32], embedding=16)
    s = EpisodeSampler(train_ds, 5, 1, 3, seed=0)
    vs = EpisodeSampler(val_ds, 5, 1, 3, seed=1)
    return m, s, vs


def test_plateau_schedule_stops_at_min_lr(synthetic, tmp_path: Path) -> None:
    m, s, vs = _mlp_setup(synthetic)
    cfg = TrainConfig(episodes=400, schedule="plateau", patience=0, gamma=0.1, lr=1e-3, min_lr=1e-4,
                      stop_at_min_lr=True, val_every=2, val_episodes=EVAL_BATCH, ckpt_every=1000, log_every=2,
                      grad_clip=1.0)
    res = train(m, s, cfg, tmp_path, val_sampler=vs, progress=False)
    assert res.stopped_early and res.steps < 400
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "val"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == res.steps
    # without stop_at_min_lr the run goes on to the end
    m, s, vs = _mlp_setup(synthetic)
    cfg.stop_at_min_lr, cfg.episodes = False, 40
    res = train(m, s, cfg, tmp_path / "b", val_sampler=vs, progress=False)
    assert not res.stopped_early and res.steps == 40


def test_step_schedule_and_no_validation(synthetic, tmp_path: Path) -> None:
    m, s, _ = _mlp_setup(synthetic)
    res = train(m, s, TrainConfig(episodes=6, step_size=2, gamma=0.5, lr=0.01, val_every=0, log_every=1),
                tmp_path, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.005, 0.005, 0.0025, 0.0025, 0.00125])
    assert res.steps == 6 and res.best_val == -math.inf
    assert (tmp_path / "checkpoints" / "best.pt").is_file()      # without validation best = last


def test_time_limit_stops_with_validation_and_checkpoints(synthetic, tmp_path: Path) -> None:
    m, s, vs = _mlp_setup(synthetic)
    cfg = TrainConfig(episodes=500, time_limit_s=1e-9, val_every=100, val_episodes=EVAL_BATCH, log_every=1)
    res = train(m, s, cfg, tmp_path, val_sampler=vs, progress=False)
    assert res.stopped_early and res.steps == 1
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "val"]           # a final validation at the stop
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 1
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["step"] == 1


def test_divergence_is_a_user_error(synthetic, tmp_path: Path, monkeypatch) -> None:
    m, s, _ = _mlp_setup(synthetic)
    monkeypatch.setattr(m, "loss", lambda ep: (torch.tensor(float("nan"), requires_grad=True), {}))
    with pytest.raises(FewshotError, match="diverged at step 1"):
        train(m, s, TrainConfig(episodes=3, val_every=0), tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ evaluation
def test_mean_ci_by_hand() -> None:
    accs = [100.0, 0.0, 50.0, 50.0]
    m, ci, sd = mean_ci(accs)
    assert m == 50.0
    assert sd == pytest.approx(math.sqrt((50 ** 2 + 50 ** 2) / 4))          # population std: 35.355
    assert ci == pytest.approx(1.96 * 35.35533905932738 / 2)                # 34.648
    m, ci, sd = mean_ci([80.0] * 10)
    assert (m, ci, sd) == (80.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in mean_ci([]))


def _trained_conv(ds16):
    torch.manual_seed(0)
    m = methods.build("protonet", ds16.image_shape, hidden=16)
    s = EpisodeSampler(ds16, 5, 1, 2, seed=0)
    adam_steps(m, s, 3)                         # a few steps, so BN running statistics are not trivial
    return m


def test_evaluate_writes_per_episode_csv(ds16, tmp_path: Path) -> None:
    m = _trained_conv(ds16)
    m.train()
    s = EpisodeSampler(ds16, 5, 1, 3, seed=4)
    res = evaluate(m, s, episodes=30, progress=False, csv_path=tmp_path / "eval" / "ep.csv")
    assert m.training                                   # the mode is restored
    assert res.n == 30 and len(res.accuracies) == 30
    assert (res.ways, res.shots, res.queries, res.seed) == (5, 1, 3, 4)
    m_, ci, sd = mean_ci(res.accuracies)
    assert res.mean == pytest.approx(m_) and res.ci95 == pytest.approx(ci) and res.std == pytest.approx(sd)
    assert all(abs(a * 15 / 100 - round(a * 15 / 100)) < 1e-4 for a in res.accuracies)   # k of 15 queries
    rows = list(csv.DictReader(open(tmp_path / "eval" / "ep.csv")))
    assert len(rows) == 30 and [int(r["episode"]) for r in rows] == list(range(30))
    assert float(rows[0]["accuracy"]) == pytest.approx(res.accuracies[0], abs=1e-3)
    assert {r["ways"] for r in rows} == {"5"} and {r["seed"] for r in rows} == {"4"}
    assert "±" in str(res) and "30 episodes" in str(res) and "5-way 1-shot" in str(res)
    assert "accuracies" not in res.summary()


def test_evaluate_same_episodes_for_any_chunk(ds16) -> None:
    m = _trained_conv(ds16)
    seen = {}
    orig = m.predict

    def recording(key):
        def predict(sx, sy, qx, ways=None):
            seen.setdefault(key, []).append((sx.clone(), qx.clone()))
            return orig(sx, sy, qx, ways)
        return predict

    results = {}
    for chunk in (None, 7, 1):
        m.predict = recording(chunk)
        s = EpisodeSampler(ds16, 5, 1, 3, seed=9)
        s.sample()                                      # evaluation resets the sampler to its seed first
        results[chunk] = evaluate(m, s, episodes=40, chunk=chunk, progress=False)
    ref_s = torch.cat([sx for sx, _ in seen[None]])
    ref_q = torch.cat([qx for _, qx in seen[None]])
    for chunk in (7, 1):
        assert torch.equal(torch.cat([sx for sx, _ in seen[chunk]]), ref_s)
        assert torch.equal(torch.cat([qx for _, qx in seen[chunk]]), ref_q)
        assert results[chunk].accuracies == results[None].accuracies
        assert results[chunk].loss == pytest.approx(results[None].loss, rel=1e-4)
    # another seed gives other episodes
    other = evaluate(m, EpisodeSampler(ds16, 5, 1, 3, seed=10), episodes=40, progress=False)
    assert other.accuracies != results[None].accuracies or other.loss != results[None].loss


def test_load_run_restores_the_model(ds16, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = fit(_run_config(steps=4), out, progress=False, dataset=ds16)
    again = load_run(out, "last")
    _states_equal(again.method.state_dict(), checkpoint.load(out / "checkpoints" / "last.pt")["model"])
    assert again.preprocess == run.preprocess and again.config.ways == 5 and not again.method.training
    assert load_run(out / "checkpoints" / "best.pt").path == out
    with pytest.raises(FewshotError, match="no such run directory"):
        load_run(tmp_path / "nope")
