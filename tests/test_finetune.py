"""Test-time fine-tuning (fewshot.finetune) and the raw-pixel 1-NN baseline of every evaluation: the
trained method is never changed, results repeat, fine-tuning helps on a small held-out problem, the
pseudo-episode is laid out as the sampler lays out episodes, gradient-based methods are refused, the
baseline is a hand-computed 1-NN on the evaluation's own episodes, and the eval / predict commands record
and print both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_synthetic, support_folder
from fewshot import methods
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import EVAL_BATCH, evaluate, pixel_nn_accuracy
from fewshot.finetune import TestTimeFinetune, find_finetune, with_finetune
from fewshot.tta import with_tta
from test_cli import run_cli

IDENTITY = {"affine": {"degrees": 0, "scale": [1, 1], "shear": 0, "translate": 0}}


@pytest.fixture
def held_out():
    """An untrained protonet and 5-way 1-shot episodes of shifted noisy patterns it has never seen."""
    ds = make_synthetic(n_classes=10, per_class=8, size=16, shift=1, noise=0.1)
    torch.manual_seed(0)
    m = methods.build("protonet", ds.image_shape, hidden=8).eval()
    return m, EpisodeSampler(ds, 5, 1, 3, seed=0)


def state(m: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_copy_only_deterministic_and_it_helps(held_out) -> None:
    m, s = held_out
    before = state(m)
    plain = evaluate(m, s, 25, progress=False)
    tuned = evaluate(with_finetune(m, 8, 3e-2), s, 25, progress=False)
    for k, v in m.state_dict().items():          # the trained method is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert (tuned.finetune_steps, tuned.finetune_lr) == (8, 3e-2) and plain.finetune_steps == 0
    assert "fine-tuned 8 steps at lr 0.03" in str(tuned) and "fine-tuned" not in str(plain)
    # untrained features on unseen classes: the support set alone teaches the copy (~24 % -> ~42 %)
    assert tuned.mean > plain.mean + 8, (plain.short(), tuned.short())
    assert tuned.baseline == plain.baseline      # the baseline scores the same episodes either way
    # seeded: reset (as evaluate does) and the same tasks get the same numbers; without it, new draws
    ep = s.sample(3)
    ft = with_finetune(m, 3, 3e-2)
    first = ft.predict(ep.support_x, ep.support_y, ep.query_x, 5)
    ft.reset()
    torch.testing.assert_close(ft.predict(ep.support_x, ep.support_y, ep.query_x, 5), first, rtol=0, atol=0)
    assert not torch.equal(ft.predict(ep.support_x, ep.support_y, ep.query_x, 5), first)


def test_pseudo_episode_layout() -> None:
    ds = make_synthetic(n_classes=6, per_class=5, size=16)
    m = methods.build("protonet", ds.image_shape, hidden=8)
    ep = EpisodeSampler(ds, 3, 2, 1, seed=3).sample(1)
    perm = torch.tensor([2, 0, 4, 1, 3, 5])       # a support not ordered by class
    sx, sy = ep.support_x[:, perm], ep.support_y[:, perm]
    ft = TestTimeFinetune(m, 1, 1e-3, IDENTITY, views=2)
    pe = ft.pseudo_episode(sx, sy, 3, torch.Generator().manual_seed(0))
    assert (pe.ways, pe.shots, pe.queries) == (3, 2, 4)
    assert pe.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] and torch.equal(pe.support_x, ep.support_x)
    assert pe.query_y.tolist() == [[0] * 4 + [1] * 4 + [2] * 4]
    # identity jitter: the pseudo-queries are the support images, each class's block its own images
    for n in range(3):
        block = pe.query_x[0, 4 * n:4 * n + 4]
        assert all(any(torch.allclose(q, s_, atol=1e-4) for s_ in ep.support_x[0, 2 * n:2 * n + 2]) for q in block)
    with pytest.raises(FewshotError, match="same number of support images"):
        ft.pseudo_episode(sx[:, :5], sy[:, :5], 3, torch.Generator())


def test_composes_with_tta_and_every_metric_method_runs() -> None:
    ds = make_synthetic(n_classes=6, per_class=5, size=16)
    ep = EpisodeSampler(ds, 3, 1, 2, seed=1).sample(2)
    for name in ("protonet", "matching", "relation", "siamese", "gaussian", "hallucinate", "taskcond"):
        m = methods.build(name, ds.image_shape, hidden=8).eval()
        before = state(m)
        out = with_tta(with_finetune(m, 2, 1e-3), 1).predict(ep.support_x, ep.support_y, ep.query_x, 3)
        assert out.shape == (2, 6, 3) and torch.isfinite(out).all(), name
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    wrapped = with_tta(with_finetune(m, 2, 1e-3), 2)
    assert find_finetune(wrapped).steps == 2 and find_finetune(m) is None and with_finetune(m, 0, 0) is m


def test_refusals() -> None:
    ds = make_synthetic(n_classes=6, per_class=5, size=16)
    with pytest.raises(FewshotError, match="maml already adapts"):
        with_finetune(methods.build("maml", ds.image_shape, outputs=3), 2, 1e-3)
    proto = methods.build("protonet", ds.image_shape, hidden=8)
    for steps, lr, what in ((-1, 1e-3, "--finetune-steps"), (2, 0.0, "--finetune-lr"),
                            (2, float("nan"), "--finetune-lr")):
        with pytest.raises(FewshotError, match=what):
            with_finetune(proto, steps, lr)
    semi = methods.build("semisup", ds.image_shape, hidden=8)
    with pytest.raises(FewshotError, match="also carry unlabeled_x"):
        with_finetune(semi, 2, 1e-3).predict_episode(EpisodeSampler(ds, 3, 1, 2, unlabeled=1).sample(1))


# ------------------------------------------------------------------------------------------ baseline
def test_pixel_nn_by_hand() -> None:
    # one task, 2 ways x 1 shot of 1x1x2 "images"; queries nearest to the other class's image where noted
    sx = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 1, 2)
    sy = torch.tensor([[0, 1]])
    qx = torch.tensor([[0.1, 0.0], [0.9, 1.2], [0.8, 0.7], [0.4, 0.4]]).view(1, 4, 1, 1, 2)
    qy = torch.tensor([[0, 1, 0, 0]])              # query 3 is nearer class 1: wrong; query 4 right
    assert pixel_nn_accuracy(sx, sy, qx, qy).tolist() == [75.0]


def test_evaluate_scores_the_baseline_on_its_own_episodes(held_out) -> None:
    m, s = held_out
    res = evaluate(m, s, 30, progress=False)
    s.generator.manual_seed(s.seed)
    per_task = []
    while len(per_task) < 30:
        ep = s.sample(EVAL_BATCH)
        for i in range(EVAL_BATCH):
            d = torch.cdist(ep.query_x[i].flatten(1), ep.support_x[i].flatten(1))
            per_task.append(100 * float((ep.support_y[i][d.argmin(1)] == ep.query_y[i]).float().mean()))
    assert res.baseline == pytest.approx(sum(per_task[:30]) / 30)
    assert res.baseline_line().startswith(f"baseline (pixel 1-NN): {res.baseline:.2f} ± ")
    assert evaluate(m, s, 5, progress=False, baseline=False).baseline is None


def test_no_baseline_for_regression_families() -> None:
    from fewshot import tasks
    m = methods.build("maml", (1,), outputs=1, backbone="mlp")
    res = evaluate(m, tasks.make("sine", 5, 5, seed=0), 5, progress=False)
    assert res.metric == "mse" and res.baseline is None


# ------------------------------------------------------------------------------------------ commands
def test_cli_eval_and_predict(capsys, tmp_path: Path, image_root: Path) -> None:
    from test_cli import SMALL
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--episodes", "3", "--val-every",
                           "0", "--out", run, *SMALL)
    assert rc == 0, err
    assert "baseline (pixel 1-NN): " in out                  # the final test prints it too
    rc, out, err = run_cli(capsys, "eval", run, "--episodes", "6", "--no-progress")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[1].startswith("baseline (pixel 1-NN): ") and lines[1].endswith(" %"), out
    rc, out, err = run_cli(capsys, "eval", run, "--episodes", "6", "--finetune-steps", "2", "--finetune-lr",
                           "0.001", "--no-progress")
    assert rc == 0, err
    assert "fine-tuned 2 steps at lr 0.001" in out.splitlines()[0] and "baseline (pixel 1-NN)" in out
    evals = sorted(p.name for p in (run / "eval").glob("*.json"))
    tuned = [n for n in evals if "-ft2lr0.001" in n]
    assert len(tuned) == 1 and len(evals) == 2, evals        # the plain result is not overwritten
    rec = json.loads((run / "eval" / tuned[0]).read_text())
    assert (rec["finetune_steps"], rec["finetune_lr"]) == (2, 0.001)
    assert 0 <= rec["baseline"] <= 100 and rec["baseline_ci95"] >= 0
    rc, out, err = run_cli(capsys, "eval", run, "--episodes", "6", "--no-baseline", "--no-progress")
    assert rc == 0 and "baseline" not in out, err
    chosen = support_folder(image_root, tmp_path / "support", classes=3, shots=2)
    files = [sorted(c.iterdir())[-1] for c in chosen]        # an image of each class not in the support
    rc, out, err = run_cli(capsys, "predict", run, "--support", tmp_path / "support", "--query", *files,
                           "--finetune-steps", "2", "--finetune-lr", "0.001", "--out", tmp_path / "p.csv")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 3


# ------------------------------------------------------------------------------------------ small-data defaults
def test_native_settings_of_a_folder(tmp_path: Path) -> None:
    from PIL import Image
    from fewshot.data.native import folder_settings, native_settings
    for c in range(2):                      # 92x112 colour photos (width x height), like the face set
        (tmp_path / "faces" / f"p{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (92, 112), (40 * i, 10, 200)).save(tmp_path / "faces" / f"p{c}" / f"{i}.jpg")
    assert folder_settings(tmp_path / "faces") == ((84, 69), 3)     # the longer side capped at 84
    (tmp_path / "grey" / "a").mkdir(parents=True)
    Image.new("L", (32, 32)).save(tmp_path / "grey" / "a" / "x.png")
    assert folder_settings(tmp_path / "grey") == ((32, 32), 1)
    assert native_settings("omniglot", "omniglot") == ((28, 28), 1)    # the measured Omniglot defaults
    assert native_settings("mini-imagenet", "mini-imagenet") == ((84, 84), 3)


def test_defaults_fit_small_data(capsys, tmp_path: Path) -> None:
    import fewshot as fs
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / "data", n_classes=8, per_class=7, size=20)
    cfg = fs.RunConfig(method="protonet", data=str(data), size="auto", split="fraction:0.25", val_fraction=0)
    cfg.train.episodes, cfg.train.val_every = 2, 0
    run = fs.fit(cfg, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    # protonet's recipe is 60-way 5-shot 5-query: 6 training classes of 7 images give 6 ways and 2 queries
    assert (run.config.ways, run.config.shots, run.config.queries) == (6, 5, 2)
    assert "training episodes of 6 ways" in err and "2 queries per class" in err
    assert run.preprocess.size == (20, 20) and fs.RunConfig.load(tmp_path / "run" / "config.yaml").size == [20, 20]
    # a value the user set is theirs: the sampler refuses it rather than changing it
    cfg = fs.RunConfig(method="protonet", data=str(data), ways=7, split="fraction:0.25", val_fraction=0)
    with pytest.raises(FewshotError, match="7 ways"):
        fs.fit(cfg, tmp_path / "run2", progress=False)
