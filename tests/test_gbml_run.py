"""Gradient-based methods through the same runs, CLI and evaluator as every method: image episodes,
sine regression (MSE and the adaptation plot), toy binary tasks, exact resume, and learning for real."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fewshot as fs

from conftest import support_folder
from test_cli import run_cli


def _tiny_image_train(tmp_path: Path, image_root: Path, method: str, *extra) -> list:
    return ["train", method, "--data", image_root, "--size", "16", "--ways", "3", "--shots", "1",
            "--queries", "2", "--batch", "2", "--episodes", "3", "--split", "fraction:0.5", "--val-every", "0",
            "--hidden", "8", "--test-ways", "3", "--test-queries", "2", "--test-episodes", "10", "--no-progress",
            "--out", tmp_path / method, *extra]


@pytest.mark.parametrize("method, extra", [
    ("maml", []), ("fomaml", []), ("anil", []), ("boil", []), ("metasgd", []),
    ("cavia", ["--context", "4"]), ("adml", []), ("taml", []),
    ("maml", ["--taml", "gini", "--bn", "running", "--out-suffix"]),
    ("reptile", ["--inner-steps", "2", "--test-steps", "2", "--optimizer", "sgd", "--lr", "1.0",
                 "--schedule", "linear"]),
])
def test_every_gradient_method_trains_evaluates_and_predicts(capsys, tmp_path: Path, image_root: Path,
                                                             method: str, extra: list) -> None:
    """Each registered gradient-based method runs train -> eval -> predict from the command line."""
    if "--out-suffix" in extra:
        extra = [e for e in extra if e != "--out-suffix"]
    rc, out, err = run_cli(capsys, *_tiny_image_train(tmp_path, image_root, method, *extra))
    assert rc == 0, err
    assert "test accuracy:" in out and "3-way 1-shot" in out
    run = tmp_path / method
    cfg = fs.RunConfig.load(run / "config.yaml")
    assert cfg.options["outputs"] == 3                      # the head size was filled in from --ways
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--shots", "2", "--queries", "2",
                           "--episodes", "10", "--no-progress")
    assert rc == 0 and "3-way 2-shot" in out, err
    rc, _, err = run_cli(capsys, "eval", run, "--ways", "5", "--queries", "2", "--episodes", "5",
                         "--no-progress")
    assert rc == 2 and "3-way head" in err and "Traceback" not in err


def test_predict_with_a_gradient_method(capsys, tmp_path: Path, image_root: Path) -> None:
    rc, _, err = run_cli(capsys, *_tiny_image_train(tmp_path, image_root, "maml"))
    assert rc == 0, err
    sup = tmp_path / "support"
    classes = support_folder(image_root, sup)
    query = sorted(classes[1].iterdir())[1]
    rc, out, err = run_cli(capsys, "predict", tmp_path / "maml", "--support", sup, "--query", query,
                           "--no-progress")
    assert rc == 0, err
    assert out.split("\t")[1] in {c.name for c in classes}


def test_sine_train_eval_plot(capsys, tmp_path: Path) -> None:
    """Sine regression: MSE on held-out tasks, and the before/after-adaptation plot."""
    run = tmp_path / "sine"
    rc, out, err = run_cli(capsys, "train", "maml", "--data", "sine", "--shots", "5", "--queries", "5",
                           "--batch", "4", "--episodes", "20", "--val-every", "10", "--val-episodes", "8",
                           "--val-shots", "5", "--inner-lr", "0.01", "--bn", "none", "--test-shots", "5",
                           "--test-queries", "20", "--test-episodes", "20", "--no-progress", "--out", run)
    assert rc == 0, err
    assert "test error: MSE" in out and "5-shot 20-query" in out
    rc, out, err = run_cli(capsys, "eval", run, "--shots", "10", "--queries", "10", "--episodes", "30",
                           "--no-progress")
    assert rc == 0 and out.startswith("MSE") and "30 tasks" in out, err
    saved = json.loads(next((run / "eval").glob("sine-10s10q*.json")).read_text())
    assert saved["metric"] == "mse" and saved["n"] == 30
    rc, out, err = run_cli(capsys, "plot", run)
    assert rc == 0, err
    assert (run / "plots" / "sine_adaptation.png").stat().st_size > 10_000
    assert (run / "plots" / "learning_curves.png").is_file()
    rc, _, err = run_cli(capsys, "predict", run, "--support", tmp_path, "--query", tmp_path)
    assert rc == 2 and "task family" in err


def test_sine_adaptation_helps_after_meta_training() -> None:
    """400 MAML steps on sine: one inner step lowers the held-out MSE by a fifth or more, below the
    variance of the targets (A^2/2 averaged over A ~ U(0.1, 5): about 4.2)."""
    torch.manual_seed(0)
    cfg = fs.RunConfig(method="maml", data="sine", shots=10, queries=10, batch=10,
                       options={"mlp_hidden": [40, 40], "bn": "none", "inner_lr": 0.05})
    cfg.train.episodes, cfg.train.val_every, cfg.train.schedule = 400, 0, "none"
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        run = fs.fit(cfg, d, progress=False)
        tasks = fs.tasks.make("sine", 10, 50, batch=50, seed=99)
        ep = tasks.sample()
        before = run.method.predict(ep.support_x, ep.support_y, ep.query_x, steps=0)
        after = run.method.predict(ep.support_x, ep.support_y, ep.query_x)
    mse_before = float((before - ep.query_y).pow(2).mean())
    mse_after = float((after - ep.query_y).pow(2).mean())
    assert mse_after < 0.8 * mse_before and mse_after < 3.3, (mse_before, mse_after)


def test_toy_binary_beats_chance_on_held_out_tasks(tmp_path: Path) -> None:
    """First-order MAML with a logistic model on the toy binary family: held-out 2-way 5-shot tasks are
    classified well above chance (50%)."""
    cfg = fs.RunConfig(method="fomaml", data="toy-binary", shots=5, queries=15, batch=8,
                       options={"mlp_hidden": [], "bn": "none", "inner_lr": 0.5, "inner_steps": 3})
    cfg.train.episodes, cfg.train.val_every, cfg.train.lr = 150, 0, 0.05
    run = fs.fit(cfg, tmp_path / "toy", progress=False)
    res = fs.evaluate_run(run, shots=5, queries=15, episodes=200, progress=False)
    assert res.metric == "accuracy" and res.ways == 2
    assert res.mean > 70, str(res)


def test_toy_binary_tasks_are_balanced_and_labelled_by_their_boundary() -> None:
    t = fs.tasks.make("toy-binary", 4, 6, batch=3, seed=0)
    ep = t.sample()
    assert ep.support_x.shape == (3, 8, 50) and ep.query_x.shape == (3, 12, 50)
    assert ep.support_y.tolist()[0] == [0] * 4 + [1] * 4
    w = ep.extra["w"]
    side = ((ep.query_x - 0.5) @ w.unsqueeze(-1)).squeeze(-1) > 0
    assert torch.equal(side.long(), ep.query_y)
    assert ep.support_x.min() >= 0 and ep.support_x.max() <= 1


def test_sine_tasks_follow_the_published_ranges() -> None:
    t = fs.tasks.make("sine", 10, 5, batch=500, seed=3)
    ep = t.sample()
    a, ph = ep.extra["amplitude"], ep.extra["phase"]
    assert 0.1 <= float(a.min()) and float(a.max()) <= 5.0 and 0 <= float(ph.min()) and float(ph.max()) <= 3.1416
    assert float(ep.support_x.abs().max()) <= 5.0
    torch.testing.assert_close(ep.query_y, a.view(-1, 1, 1) * torch.sin(ep.query_x - ph.view(-1, 1, 1)))
    again = fs.tasks.make("sine", 10, 5, batch=500, seed=3).sample()
    assert torch.equal(again.support_x, ep.support_x)


def test_maml_resume_is_exact(tmp_path: Path) -> None:
    """An interrupted MAML run resumed ends with the same weights as an uninterrupted one (CPU)."""
    def cfg(episodes):
        c = fs.RunConfig(method="maml", data="sine", shots=5, queries=5, batch=3,
                         options={"mlp_hidden": [8], "bn": "none", "inner_lr": 0.05})
        c.train.episodes, c.train.val_every, c.train.ckpt_every, c.train.schedule = episodes, 0, 2, "none"
        return c
    full = fs.fit(cfg(6), tmp_path / "full", progress=False)
    fs.fit(cfg(4), tmp_path / "part", progress=False)
    resumed = fs.fit(cfg(6), tmp_path / "part", resume=True, progress=False)
    a, b = full.method.state_dict(), resumed.method.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_gradient_options_are_one_line_errors(capsys, tmp_path: Path) -> None:
    for args, fragment in [
        (["--bn", "weird"], "unknown batch-norm mode 'weird'"),
        (["--adapt", "everything"], "unknown adapt choice"),
        (["--combine", "agreement", "--taml", "gini"], "not both"),
        (["--optimizer", "lbfgs"], "unknown optimizer"),
    ]:
        rc, _, err = run_cli(capsys, "train", "maml", "--data", "sine", "--episodes", "1", "--no-progress",
                             "--out", tmp_path / "bad", "--overwrite", *args)
        assert rc == 2 and fragment in err and "Traceback" not in err, (args, err)


def test_methods_start_from_their_literature_settings(capsys, tmp_path: Path, image_root: Path) -> None:
    """Without a recipe, `fewshot train reptile` uses Reptile's meta-batch and outer SGD step; flags win."""
    rc, _, err = run_cli(capsys, "train", "reptile", "--data", image_root, "--size", "16", "--episodes", "1",
                         "--queries", "2", "--split", "fraction:0.5", "--val-every", "0", "--hidden", "4",
                         "--inner-steps", "1", "--test-steps", "1", "--no-eval", "--no-progress",
                         "--out", tmp_path / "r")
    assert rc == 0, err
    cfg = fs.RunConfig.load(tmp_path / "r" / "config.yaml")
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.batch) == (5, 1, 2, 5)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.schedule) == ("sgd", 1.0, "linear")
