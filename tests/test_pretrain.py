"""The pretraining stage (fewshot.pretrain, ``--pretrain-epochs``) and the simpleshot method: pretraining
learns (its loss falls, the pretrained protonet beats chance on held-out classes where raw pixels do
not), resumes bit-identically from any stop (mid-epoch, at its end, during meta-training after it),
refuses changed settings and methods without a backbone, trains a gradient-based network's body but not
its head; simpleshot learns, and its CL2N features are centred by the training mean, not the support's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fewshot as fs
from fewshot import checkpoint, methods, pretrain, rundir
from fewshot.cli import main
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.methods.simpleshot import transform
from fewshot.train import TrainingInterrupted

from conftest import make_nuisance

#: a small MLP encoder for the 12x12 nuisance images (conv4 needs 16 pixels a side)
MLP = {"backbone": "mlp", "mlp_hidden": [64], "embedding": 32}


@pytest.fixture(scope="module")
def splits():
    """40 classes x 20 nuisance images (the class lives in a 4x4 corner, noise elsewhere): 30 to train, 10
    held out."""
    return make_nuisance(n_classes=40, per_class=20).split_fraction(test=0.25, seed=0)


def _cfg(method="protonet", epochs=3, episodes=4, **kw) -> fs.RunConfig:
    tc = dict(episodes=episodes, val_every=0, log_every=1, lr=1e-4, ckpt_every=2)
    tc.update(kw.pop("train", {}))
    base = dict(method=method, options=dict(MLP), data="nuisance", split="none", val_fraction=0.0, ways=5,
                shots=1, queries=3, device="cpu", precision="fp32", channels_last=False, seed=3,
                pretrain_epochs=epochs, pretrain_batch=32, pretrain_lr=3e-3,
                augment={"affine": {"degrees": 5, "translate": 0.05}}, train=fs.TrainConfig(**tc))
    base.update(kw)
    return fs.RunConfig(**base)


def _rows(out: Path, kind=None) -> list:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows if kind is None or r["kind"] == kind]


def _held_out(method, test_ds, episodes=100) -> float:
    return evaluate(method, EpisodeSampler(test_ds, 5, 1, 5, seed=0), episodes, progress=False).mean


# ------------------------------------------------------------------------------------------ it learns
def test_pretraining_lowers_its_loss_and_the_pretrained_protonet_beats_chance(splits, tmp_path) -> None:
    train_ds, test_ds = splits
    out = tmp_path / "run"
    run = fs.fit(_cfg(epochs=8, episodes=1, augment={}), out, progress=False, dataset=train_ds)
    rows = _rows(out, "pretrain")
    assert [r["epoch"] for r in rows] == list(range(1, 9)) and rows[-1]["step"] == 8 * (600 // 32)
    assert rows[-1]["loss"] < 0.25 * rows[0]["loss"] and rows[-1]["acc"] > 0.9     # 30 training classes
    assert [r["step"] for r in _rows(out, "train")] == [1]        # the episodic rows follow, both kept
    ck = checkpoint.load(out / "checkpoints" / "pretrain.pt")
    assert ck["done"] and ck["epoch"] == 8 and ck["classes"] == 30 and ck["classifier"]["weight"].shape == (30, 32)
    assert "checkpoints/pretrain.pt" in rundir.written_files(out)      # replaced by --overwrite like the rest
    acc = _held_out(run.method, test_ds)
    print(f"pretrained protonet, 5-way 1-shot held-out: {acc:.1f}%")
    assert acc > 20 + 40, acc              # chance 20 %; the untrained encoder scores about 40 %


def test_a_gradient_based_network_pretrains_its_body_and_keeps_its_head(splits, tmp_path) -> None:
    train_ds, _ = splits
    cfg = _cfg("maml", epochs=1, options={"backbone": "mlp", "outputs": 5, "workers": 1})
    torch.manual_seed(0)
    m = methods.build("maml", train_ds.image_shape, **cfg.options)
    assert (m.backbone_attr, m.backbone_head) == ("net", "head")
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    assert pretrain.run_stage(m, train_ds, cfg, tmp_path, torch.device("cpu")) is False
    after = m.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("layers."))
    # the separate classifier sits on the head's input (the network's features), one output per class
    assert checkpoint.load(tmp_path / "checkpoints" / "pretrain.pt")["classifier"]["weight"].shape == \
        (30, m.net.head.in_features)


# ------------------------------------------------------------------------------------------ resume
def _stop_at(stage_step: int, stage: int):
    """on_step that raises KeyboardInterrupt (a Ctrl-C between steps) at step ``stage_step`` of stage
    ``stage`` (0: pretraining, 1: meta-training; each counts its steps from 1)."""
    seen = {"stage": 0, "last": 0}

    def stop(step: int) -> None:
        if step < seen["last"]:
            seen["stage"] += 1
        seen["last"] = step
        if seen["stage"] == stage and step == stage_step:
            raise KeyboardInterrupt
    return stop


def _same_checkpoints(a: Path, b: Path, names=("pretrain", "last", "best")) -> None:
    for name in names:
        ca, cb = (checkpoint.load(p / "checkpoints" / f"{name}.pt") for p in (a, b))
        assert ca["step"] == cb["step"], name
        for part in ("model", "classifier"):
            if part in ca:
                assert ca[part].keys() == cb[part].keys()
                assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), (name, part)
        for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert _rows(a) == _rows(b)                     # the same losses, accuracies and learning rates


# 3 epochs of 18 steps: stopped mid-epoch 2, at the stage's last step, and during meta-training after it
@pytest.mark.parametrize("stop", [(25, 0), (54, 0), (2, 1)], ids=["mid-epoch", "end-of-stage", "meta-training"])
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(splits, tmp_path, stop) -> None:
    train_ds, _ = splits
    full = tmp_path / "full"
    fs.fit(_cfg(), full, progress=False, dataset=train_ds)
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted) as e:
        fs.fit(_cfg(), part, progress=False, dataset=train_ds, on_step=_stop_at(*stop))
    assert e.value.saved and e.value.step == stop[0]
    saved = checkpoint.load(part / "checkpoints" / "pretrain.pt")
    if stop[1] == 0:
        assert e.value.path.name == "pretrain.pt" and saved["step"] == stop[0]
        assert saved["done"] == (stop[0] == 54) and not (part / "checkpoints" / "last.pt").exists()
    else:       # meta-training was under way: its checkpoint resumes it and the pretraining is not redone
        assert e.value.path.name == "last.pt" and saved["done"]

    steps: list = []
    fs.fit(_cfg(), part, resume=True, progress=False, dataset=train_ds, on_step=steps.append)
    # the resumed run goes on from the next step; after the pretraining, it has only meta-training steps
    assert steps == (list(range(stop[0] + 1, 55)) + [1, 2, 3, 4] if stop[1] == 0 else [3, 4])
    _same_checkpoints(full, part)
    assert len(_rows(part, "pretrain")) == 3


def test_resume_refuses_changed_pretraining_settings(splits, tmp_path) -> None:
    train_ds, _ = splits
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fs.fit(_cfg(), out, progress=False, dataset=train_ds, on_step=_stop_at(5, 0))
    with pytest.raises(FewshotError, match="already holds a run"):      # a stopped pretraining is a run
        fs.fit(_cfg(), out, progress=False, dataset=train_ds)
    for change, shown in (({"pretrain_epochs": 4}, "pretrain_epochs: 3 -> 4"),
                          ({"pretrain_lr": 1e-2}, "pretrain_lr: 0.003 -> 0.01"),
                          ({"pretrain_batch": 16}, "pretrain_batch: 32 -> 16")):
        with pytest.raises(FewshotError, match=f"--resume would change .*{shown}"):
            fs.fit(_cfg(**change), out, resume=True, progress=False, dataset=train_ds)


# ------------------------------------------------------------------------------------------ errors
def _cli(capsys, *args) -> tuple:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args,message", [
    (["mann", "--classes", "3"], "method mann has no backbone network to pretrain"),
    (["maml", "--data", "sine"], "--data sine is a task family"),
    (["protonet", "--tasks", "umtra"], "--tasks umtra never uses"),
    (["protonet", "--pretrain-lr", "0"], "pretrain_lr must be more than 0"),
    (["protonet", "--pretrain-batch", "0"], "pretrain_batch must be at least 1"),
], ids=["no-backbone", "task-family", "label-free", "lr", "batch"])
def test_pretraining_where_it_cannot_run_is_a_one_line_error_and_leaves_no_run(capsys, image_root, tmp_path,
                                                                               args, message) -> None:
    out = tmp_path / "run"
    data = [] if "--data" in args else ["--data", image_root]
    rc, _, err = _cli(capsys, "train", *args, *data, "--out", out, "--pretrain-epochs", "2", "--episodes", "1",
                      "--size", "28", "--no-progress", "--no-eval")
    assert rc == 2 and err.startswith("fewshot: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ simpleshot
def test_simpleshot_defaults_pretrain_and_beat_chance_by_a_margin(splits, tmp_path) -> None:
    train_ds, test_ds = splits
    cfg = fs.RunConfig(method="simpleshot", options=dict(MLP), data="nuisance", split="none", val_fraction=0.0,
                       ways=5, shots=1, queries=3, device="cpu", precision="fp32", pretrain_batch=32)
    run = fs.fit(cfg, tmp_path / "ss", progress=False, dataset=train_ds)
    defaults = methods.get("simpleshot").run_defaults
    assert run.config.pretrain_epochs == defaults["pretrain_epochs"] > 0           # its run_defaults apply
    assert run.train_result.steps == defaults["train"]["episodes"]
    # post_train stored the training classes' mean feature in the checkpoint (both of them)
    for which in ("best", "last"):
        ck = checkpoint.load(tmp_path / "ss" / "checkpoints" / f"{which}.pt")
        assert ck["post_train"] == {"centring_images": 600, "features": "CL2N"}
        assert torch.allclose(ck["model"]["mean"], run.method.training_mean(train_ds), atol=1e-5)
    acc = _held_out(run.method, test_ds)
    print(f"simpleshot, 5-way 1-shot held-out: {acc:.1f}%")
    assert acc > 20 + 45, acc


def test_cl2n_centres_by_the_training_mean_not_the_supports(splits) -> None:
    train_ds, test_ds = splits
    torch.manual_seed(0)
    m = methods.build("simpleshot", train_ds.image_shape, **MLP).eval()
    m.post_train(train_ds)
    x = train_ds.data.float() / 255
    assert torch.allclose(m.mean, m.backbone(x).mean(0), atol=1e-5)     # the mean over every training image
    ep = EpisodeSampler(test_ds, 5, 1, 3, batch=2, seed=1).sample()
    with torch.no_grad():
        logits = m.predict(ep.support_x, ep.support_y, ep.query_x, 5)
        zs, zq = m.backbone(ep.support_x.flatten(0, 1)), m.backbone(ep.query_x.flatten(0, 1))

        def by_hand(centre):
            s = F.normalize(zs - centre, dim=-1).view(2, 5, -1)        # 1 shot: the centroids are the shots
            q = F.normalize(zq - centre, dim=-1).view(2, 15, -1)
            return -torch.cdist(q, s).pow(2) * m.log_scale.exp()
        assert torch.allclose(logits, by_hand(m.mean), atol=1e-4)
        support_centred = by_hand(zs.mean(0))
        assert not torch.allclose(logits, support_centred, atol=1e-2)
        # L2N ignores the mean, UN is the raw features
        m.config.features = "L2N"
        assert torch.allclose(m.predict(ep.support_x, ep.support_y, ep.query_x, 5), by_hand(0.0), atol=1e-4)
        m.config.features = "UN"
        raw = -torch.cdist(zq.view(2, 15, -1), zs.view(2, 5, -1)).pow(2) * m.log_scale.exp()
        assert torch.allclose(m.predict(ep.support_x, ep.support_y, ep.query_x, 5), raw, rtol=1e-4, atol=1e-3)
    assert torch.equal(transform(zs, "UN", m.mean), zs)
    with pytest.raises(FewshotError, match="unknown features 'CL3N'"):
        methods.build("simpleshot", train_ds.image_shape, features="CL3N", **MLP)


def test_simpleshot_trains_episodically_alone_and_lists_its_options(capsys, image_root, tmp_path) -> None:
    rc, out, err = _cli(capsys, "train", "simpleshot", "--data", image_root, "--out", tmp_path / "ss",
                        "--pretrain-epochs", "0", "--episodes", "3", "--size", "28", "--ways", "3", "--shots",
                        "1", "--queries", "2", "--split", "fraction:0.5", "--val-fraction", "0", "--hidden", "8",
                        "--no-progress", "--no-eval")
    assert rc == 0, err
    assert "trained simpleshot for 3 steps" in out and not (tmp_path / "ss" / "checkpoints" / "pretrain.pt").exists()
    with pytest.raises(SystemExit):
        main(["train", "simpleshot", "--help"])
    text = capsys.readouterr().out
    assert "--features FEATURES" in text and "CL2N" in text and "--mean-momentum" in text
    assert "--pretrain-epochs" in text and "--pretrain-lr" in text and "--pretrain-batch" in text
    assert "--distance" not in text            # protonet's options are not simpleshot's
