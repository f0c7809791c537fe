"""Relation networks: the architecture's shapes, the one-hot MSE and the K-shot rules against hand
computations, zero-shot learning from class attribute vectors, learning on held-out classes, and
train -> eval -> predict -> plot through the CLI (few-shot and zero-shot)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fewshot as fs
from conftest import adam_steps, class_dirs, make_nuisance, make_synthetic, support_folder
from fewshot import methods
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import Episode, EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.methods.relation import class_mean_log_scores, class_sums, relation_targets

from test_cli import assert_one_line_error, run_cli


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("size, side", [(28, 7), (84, 21), (16, 4)])
def test_image_variant_keeps_a_spatial_map(size: int, side: int) -> None:
    torch.manual_seed(0)
    m = methods.build("relation", (3, size, size), hidden=8).eval()
    assert m.kind == "image"
    assert m.embed(torch.rand(2, 3, size, size)).shape == (2, 8, side, side)
    lin = [l for l in m.relation if isinstance(l, nn.Linear)]
    assert [l.out_features for l in lin] == [8, 1]          # the paper's 8 hidden units, then the score
    sx, qx = torch.rand(2, 6, 3, size, size), torch.rand(2, 4, 3, size, size)
    sy = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6)
    with torch.no_grad():
        out = m.predict(sx, sy, qx, 3)
    assert out.shape == (2, 4, 3) and (out <= 0).all()      # log of scores in (0, 1)


def test_vector_and_zero_shot_shapes() -> None:
    torch.manual_seed(0)
    v = methods.build("relation", (10,), mlp_hidden=[16], embedding=8, mlp_relation_hidden=12).eval()
    assert v.kind == "vector" and v.relation[0].in_features == 16
    out = v.predict(torch.rand(3, 6, 10), torch.tensor([0, 1, 2, 0, 1, 2]).expand(3, 6), torch.rand(3, 5, 10))
    assert out.shape == (3, 5, 3)
    z = methods.build("relation", (1, 16, 16), hidden=8, zero_shot=True, attr_dim=5, attr_hidden=32).eval()
    assert z.kind == "zero_shot" and z.embed(torch.rand(2, 1, 16, 16)).shape == (2, 8)
    out = z.predict(torch.rand(2, 4, 5), torch.arange(4).expand(2, 4), torch.rand(2, 7, 1, 16, 16), 4)
    assert out.shape == (2, 7, 4)


def test_option_errors() -> None:
    with pytest.raises(FewshotError, match="at least 16x16"):
        methods.build("relation", (1, 12, 12), backbone="conv4")
    with pytest.raises(FewshotError, match="unknown backbone"):
        methods.build("relation", (1, 28, 28), backbone="resnet")
    with pytest.raises(FewshotError, match="needs --attributes CLASS_VECTORS.csv"):
        methods.build("relation", (1, 28, 28), zero_shot=True)
    with pytest.raises(FewshotError, match="relation_hidden must be at least 1"):
        methods.build("relation", (1, 28, 28), relation_hidden=0)
    assert methods.describe("relation").startswith("Relation network")


# ------------------------------------------------------------------------------------------ hand cases
class DotScore(nn.Module):
    """A relation module with a known formula: logit = <class side, query side> (channel halves)."""

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        c = pairs.shape[1] // 2
        return (pairs[:, :c] * pairs[:, c:]).flatten(1).sum(1, keepdim=True)


def test_targets_and_mse_by_hand_with_k_shot_sums() -> None:
    """Image variant with the encoder and relation module replaced by known functions: class maps are summed
    over the K shots, scores are sigmoid(<sum, query>), and the loss is the MSE against one-hot targets."""
    m = methods.build("relation", (1, 16, 16), hidden=2)
    m.encoder, m.relation = nn.Identity(), DotScore()
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(1, 4, 2, 2, 2, generator=g) * 0.5     # 2 ways x 2 shots of 2x2x2 "feature maps"
    sy = torch.tensor([[0, 0, 1, 1]])
    qx = torch.randn(1, 3, 2, 2, 2, generator=g) * 0.5
    qy = torch.tensor([[1, 0, 1]])
    loss, metrics = m.loss(Episode(sx, sy, qx, qy, ways=2, shots=2, queries=1))
    s, q = sx[0].tolist(), qx[0].tolist()

    def flat(t):
        return [v for a in t for b in a for v in b]
    sums = [[a + b for a, b in zip(flat(s[0]), flat(s[1]))], [a + b for a, b in zip(flat(s[2]), flat(s[3]))]]
    se, right = 0.0, 0
    for j in range(3):
        scores = [_sig(sum(a * b for a, b in zip(sums[n], flat(q[j])))) for n in range(2)]
        se += sum((scores[n] - (1.0 if qy[0, j] == n else 0.0)) ** 2 for n in range(2))
        right += max(range(2), key=lambda n: scores[n]) == int(qy[0, j])
    assert float(loss) == pytest.approx(se / 6, rel=1e-5)
    assert metrics["relation_mse"] == pytest.approx(se / 6, rel=1e-5) and metrics["acc"] == right / 3
    assert torch.equal(relation_targets(qy, 2), torch.tensor([[[0., 1.], [1., 0.], [0., 1.]]]))


def test_k_shot_is_the_sum_of_the_feature_maps() -> None:
    """K support maps of a class give exactly the scores of one support map equal to their sum."""
    torch.manual_seed(0)
    m = methods.build("relation", (1, 16, 16), hidden=4).eval()
    m.encoder = nn.Identity()                               # inputs are 4x4x4 feature maps
    sx, qx = torch.rand(2, 6, 4, 4, 4), torch.rand(2, 5, 4, 4, 4)
    sy = torch.tensor([0, 0, 0, 1, 1, 1]).expand(2, 6)
    summed = torch.stack([sx[:, :3].sum(1), sx[:, 3:].sum(1)], 1)
    with torch.no_grad():
        a = m.predict(sx, sy, qx, 2)
        b = m.predict(summed, torch.tensor([[0, 1]] * 2), qx, 2)
        c = m.predict(sx[:, [4, 0, 5, 2, 1, 3]], sy[:, [4, 0, 5, 2, 1, 3]], qx, 2)   # order is irrelevant
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    z = torch.tensor([[[[1., 2.], [3., 4.]], [[5., 6.], [7., 8.]], [[0., 1.], [0., 1.]]]])   # [1, 3, 2, 2]
    hand = torch.tensor([[[[0., 1.], [0., 1.]], [[6., 8.], [10., 12.]]]])                 # class 0, class 1
    assert torch.equal(class_sums(z, torch.tensor([[1, 1, 0]]), 2), hand)
    with pytest.raises(FewshotError, match="at least one support example"):
        class_sums(z, torch.tensor([[1, 1, 1]]), 2)



def test_mean_shot_pooling_is_the_mean_of_the_feature_maps() -> None:
    """shot_pooling mean: K support maps score like one support map equal to their mean (so K = 1 and
    K = 5 stay on the same scale); unknown pooling is a clear error."""
    torch.manual_seed(0)
    m = methods.build("relation", (1, 16, 16), hidden=4, shot_pooling="mean").eval()
    m.encoder = nn.Identity()
    sx, qx = torch.rand(1, 5, 4, 4, 4), torch.rand(1, 3, 4, 4, 4)
    sy = torch.tensor([[0, 0, 0, 1, 1]])
    mean = torch.stack([sx[:, :3].mean(1), sx[:, 3:].mean(1)], 1)
    with torch.no_grad():
        torch.testing.assert_close(m.predict(sx, sy, qx, 2), m.predict(mean, torch.tensor([[0, 1]]), qx, 2))
    with pytest.raises(FewshotError, match="unknown shot_pooling 'max'"):
        methods.build("relation", (1, 16, 16), shot_pooling="max")

def test_vector_variant_averages_pair_scores_by_hand() -> None:
    """Vector variant: every query scored against every support sample by the relation MLP (here a known
    linear map), a class's score is the mean of its samples' sigmoid scores."""
    m = methods.build("relation", (2,), backbone="mlp")
    m.encoder = nn.Identity()
    lin = nn.Linear(4, 1)
    w, b = [0.5, -1.0, 1.0, 2.0], 0.1
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.fill_(b)
    m.relation = lin
    S = [[1., 0.], [0., 1.], [1., 1.], [-1., 0.5], [0.3, -0.2]]
    Y = [0, 1, 1, 2, 0]
    Q = [[0.2, 0.1], [-0.5, 0.4]]
    QY = [2, 0]
    log_r = m.predict(torch.tensor([S]), torch.tensor([Y]), torch.tensor([Q]), 3)
    loss, _ = m.loss(Episode(torch.tensor([S]), torch.tensor([Y]), torch.tensor([Q]), torch.tensor([QY]), 3, 1, 1))
    se = 0.0
    for j, q in enumerate(Q):
        for n in range(3):
            members = [s for s, y in zip(S, Y) if y == n]
            score = sum(_sig(w[0] * s[0] + w[1] * s[1] + w[2] * q[0] + w[3] * q[1] + b) for s in members) / len(members)
            assert float(log_r[0, j, n].detach().exp()) == pytest.approx(score, rel=1e-5)
            se += (score - (1.0 if QY[j] == n else 0.0)) ** 2
    assert float(loss.detach()) == pytest.approx(se / 6, rel=1e-5)
    # the log of a mean of sigmoids stays exact when the sigmoids underflow
    far = class_mean_log_scores(torch.tensor([[[-200., -300.]]]), torch.tensor([[0, 0]]), 1)
    assert float(far) == pytest.approx(-200 - math.log(2), abs=1e-4)


def test_zero_shot_uses_class_vectors() -> None:
    torch.manual_seed(0)
    m = methods.build("relation", (6,), zero_shot=True, attr_dim=3, mlp_hidden=[8], embedding=4,
                      attr_hidden=8, mlp_relation_hidden=8).eval()
    attrs, qx = torch.rand(2, 4, 3), torch.rand(2, 5, 6)
    ep = Episode(torch.rand(2, 4, 6), torch.arange(4).expand(2, 4), qx, torch.zeros(2, 5, dtype=torch.long),
                 4, 1, 1, extra={"attributes": attrs})
    with torch.no_grad():
        a = m.predict_episode(ep)
        assert torch.allclose(a, m.predict(attrs, torch.arange(4).expand(2, 4), qx, 4))
        # the support images play no part; reordering the class vectors with their labels changes nothing
        p = torch.tensor([2, 0, 3, 1])
        assert torch.allclose(a, m.predict(attrs[:, p], p.expand(2, 4), qx, 4), atol=1e-6)
        ep.extra = {}
        with pytest.raises(FewshotError, match="needs --attributes CLASS_VECTORS.csv"):
            m.predict_episode(ep)
        with pytest.raises(FewshotError, match=r"expected support of shape \[tasks, ways, 3\]"):
            m.predict(torch.rand(2, 4, 6), torch.arange(4).expand(2, 4), qx, 4)


def test_scores_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    m = methods.build("relation", (1, 16, 16), hidden=4).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.predict(torch.rand(1, 3, 1, 16, 16), torch.arange(3)[None], torch.rand(1, 2, 1, 16, 16), 3)
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------ learning
def test_learns_held_out_classes() -> None:
    """Vector variant, 400 20-way episodes on 40 nuisance classes (the class is a corner pattern among noise
    pixels): 5-way 1-shot on 20 unseen classes far above chance (20%; about 70% here). The learned comparison
    trains more slowly than a fixed metric (cf. test_protonet), hence more and wider episodes."""
    t = time.perf_counter()
    ds = make_nuisance()
    train_ds, test_ds = ds.split_fraction(test=1 / 3, seed=0)
    torch.manual_seed(0)
    m = methods.build("relation", ds.image_shape, backbone="mlp", mlp_hidden=[64], embedding=32,
                      mlp_relation_hidden=64)
    test_sampler = EpisodeSampler(test_ds, 5, 1, 5, seed=0)
    before = evaluate(m, test_sampler, 200, progress=False)
    adam_steps(m, EpisodeSampler(train_ds, 20, 1, 5, seed=0), 400, lr=3e-3)
    after = evaluate(m, test_sampler, 200, progress=False)
    print(f"relation 5-way 1-shot on held-out classes: {before.mean:.1f}% -> {after.mean:.1f}% "
          f"({time.perf_counter() - t:.1f} s)")
    assert after.mean > 55 and after.mean > before.mean + 20


def test_image_variant_learns_held_out_classes() -> None:
    """The convolutional model (16x16 images, 250 5-way episodes on 30 synthetic pattern classes) beats
    chance (20%) clearly on 10 unseen classes (about 55% here; the untrained model scores at chance)."""
    t = time.perf_counter()
    ds = make_synthetic(n_classes=40, per_class=10, size=16)
    train_ds, test_ds = ds.split_fraction(test=1 / 4, seed=0)
    torch.manual_seed(0)
    m = methods.build("relation", ds.image_shape, hidden=16)
    test_sampler = EpisodeSampler(test_ds, 5, 1, 5, seed=0)
    before = evaluate(m, test_sampler, 100, progress=False)
    adam_steps(m, EpisodeSampler(train_ds, 5, 1, 5, seed=0), 250, lr=3e-3)
    after = evaluate(m, test_sampler, 100, progress=False)
    print(f"relation (conv) 5-way 1-shot on held-out classes: {before.mean:.1f}% -> {after.mean:.1f}% "
          f"({time.perf_counter() - t:.1f} s)")
    assert after.mean > 40 and after.mean > before.mean + 15


def make_attribute_classes(n_classes: int = 60, per_class: int = 12, attrs: int = 10, seed: int = 0) -> ClassDataset:
    """Images that are a fixed random function of each class's binary attribute vector a: a 12x12 picture
    sigmoid(W a + noise) for one random W shared by all classes. A class never seen in training is
    recognisable from its attribute vector alone."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n_classes, attrs, generator=g) < 0.5).float()
    W = torch.randn(144, attrs, generator=g)
    parts = []
    for c in range(n_classes):
        logits = (W @ a[c]).unsqueeze(0) + 0.7 * torch.randn(per_class, 144, generator=g)
        parts.append((logits.sigmoid() * 255).round().to(torch.uint8).view(per_class, 1, 12, 12))
    return ClassDataset.from_class_tensors(parts, [f"z{c:02d}" for c in range(n_classes)], source="attr",
                                           attributes=a)


def test_zero_shot_recognises_unseen_classes_from_their_attributes() -> None:
    """500 10-way episodes on 40 attribute-generated classes: 5-way zero-shot accuracy on 20 classes never seen
    in training (recognised from their attribute vectors alone) far above chance (20%; about 90% here)."""
    t = time.perf_counter()
    ds = make_attribute_classes()
    train_ds, test_ds = ds.split_fraction(test=1 / 3, seed=0)
    assert test_ds.attributes is not None and not set(train_ds.names) & set(test_ds.names)
    torch.manual_seed(0)
    m = methods.build("relation", ds.image_shape, backbone="mlp", zero_shot=True, attr_dim=10,
                      mlp_hidden=[64], embedding=32, attr_hidden=64, mlp_relation_hidden=64)
    test_sampler = EpisodeSampler(test_ds, 5, 1, 5, seed=0)
    before = evaluate(m, test_sampler, 200, progress=False)
    adam_steps(m, EpisodeSampler(train_ds, 10, 1, 5, seed=0), 500, lr=2e-3)
    after = evaluate(m, test_sampler, 200, progress=False)
    print(f"zero-shot 5-way on unseen classes: {before.mean:.1f}% -> {after.mean:.1f}% "
          f"({time.perf_counter() - t:.1f} s)")
    assert after.mean > 75 and after.mean > before.mean + 40


# ------------------------------------------------------------------------------------------ the CLI
def _train_args(run: Path, image_root: Path, *extra) -> list:
    return ["train", "relation", "--data", image_root, "--size", "16", "--ways", "3", "--shots", "2",
            "--queries", "2", "--episodes", "20", "--split", "fraction:0.5", "--val-every", "10",
            "--val-ways", "3", "--val-queries", "2", "--val-episodes", "5", "--hidden", "8",
            "--test-ways", "3", "--test-queries", "2", "--test-episodes", "10", "--no-progress", "--out", run,
            *extra]


def test_train_eval_predict_plot_through_the_cli(capsys, tmp_path: Path, image_root: Path) -> None:
    run = tmp_path / "relation"
    rc, out, err = run_cli(capsys, *_train_args(run, image_root))
    assert rc == 0, err
    assert "test accuracy:" in out and "3-way 1-shot" in out
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--shots", "3", "--queries", "2", "--episodes",
                           "10", "--no-progress")
    assert rc == 0 and "3-way 3-shot" in out, err
    sup = tmp_path / "support"
    classes = support_folder(image_root, sup, shots=2)
    rc, out, err = run_cli(capsys, "predict", run, "--support", sup, "--query", sorted(classes[1].iterdir())[3],
                           "--no-progress")
    assert rc == 0, err
    fields = out.strip().split("\t")
    assert fields[1] in {c.name for c in classes} and 1 / 3 <= float(fields[2]) <= 1
    rc, out, err = run_cli(capsys, "plot", run)
    assert rc == 0, err
    assert (run / "plots" / "tsne_test_classes.png").stat().st_size > 10_000


def test_zero_shot_through_the_cli(capsys, tmp_path: Path, image_root: Path) -> None:
    rc, _, err = run_cli(capsys, *_train_args(tmp_path / "none", image_root, "--zero-shot", "true"))
    assert_one_line_error(rc, err, "zero-shot relation network needs --attributes CLASS_VECTORS.csv")
    g = torch.Generator().manual_seed(0)
    csv = tmp_path / "attrs.csv"
    names = [p.name for p in class_dirs(image_root, 100)]
    csv.write_text("class,a1,a2,a3,a4\n" + "".join(
        f"{n}," + ",".join(f"{v:.3f}" for v in torch.rand(4, generator=g).tolist()) + "\n" for n in names))
    run = tmp_path / "zsl"
    rc, out, err = run_cli(capsys, *_train_args(run, image_root, "--zero-shot", "true", "--attributes", csv))
    assert rc == 0, err
    assert "test accuracy:" in out
    cfg = fs.RunConfig.load(run / "config.yaml")
    assert cfg.options["attr_dim"] == 4 and cfg.options["zero_shot"] is True
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "4", "--queries", "2", "--episodes", "5",
                           "--no-progress")
    assert rc == 0 and "4-way" in out, err
    rc, out, err = run_cli(capsys, "plot", run)
    assert rc == 0 and (run / "plots" / "tsne_test_classes.png").is_file(), err
    # predict labels images from a support folder of images: a zero-shot run needs class vectors instead
    sup = tmp_path / "support"
    support_folder(image_root, sup, classes=2)
    first = sorted((image_root / names[0]).iterdir())[1]
    rc, _, err = run_cli(capsys, "predict", run, "--support", sup, "--query", first, "--no-progress")
    assert_one_line_error(rc, err, "class vectors")
