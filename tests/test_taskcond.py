"""Task-conditioned network: task statistics by hand, invariance to support order and label permutation,
FiLM conditioning (identity at initialisation, task-dependent once trained), shapes, learning on held-out
classes, and train -> eval -> predict -> plot through the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import learn_on_nuisance, make_nuisance
from fewshot import methods
from fewshot.episodes import Episode, EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.methods.protonet import distance, prototypes
from fewshot.methods.taskcond import task_statistics

from test_cli import cli_roundtrip

# one task, 1-D features: class 0 = {1, 3}, class 1 = {6, 10}
H = torch.tensor([[[1.], [3.], [6.], [10.]]])
Y = torch.tensor([[0, 0, 1, 1]])


def test_task_statistics_by_hand() -> None:
    t = task_statistics(H)
    # mean 5, population std sqrt(((1-5)^2 + (3-5)^2 + (6-5)^2 + (10-5)^2) / 4) = sqrt(46 / 4)
    assert torch.allclose(t, torch.tensor([[5., math.sqrt(11.5)]]), atol=1e-5)
    t = task_statistics(H, Y)
    # class means 2 and 8: between-class std 3; within-class stds 1 and 2: mean 1.5
    assert torch.allclose(t, torch.tensor([[5., math.sqrt(11.5), 3., 1.5]]), atol=1e-5)
    assert torch.allclose(task_statistics(H[:, :1]), torch.tensor([[1., 0.]]), atol=1e-5)       # one example: std 0
    with pytest.raises(FewshotError, match="at least one support example"):
        task_statistics(H, Y, ways=3)


@pytest.mark.parametrize("label_aware", [False, True])
def test_invariant_to_support_order_and_label_permutation(label_aware: bool) -> None:
    torch.manual_seed(0)
    m = methods.build("taskcond", (5,), backbone="mlp", mlp_hidden=[16], embedding=6, label_aware=label_aware).eval()
    with torch.no_grad():                       # make the conditioning non-trivial
        m.task_net[-1].weight.normal_(0, 0.5)
        m.task_net[-1].bias.normal_(0, 0.5)
        m.head[-1].weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(1, 9, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    sy = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])
    hs = m.backbone(sx[0]).unsqueeze(0)
    t = m.task_embedding(hs, sy, 3)
    assert t.shape == (1, (4 if label_aware else 2) * 6)
    logits = m.predict(sx, sy, qx, 3)
    order = torch.randperm(9, generator=g)
    relabel = torch.tensor([2, 0, 1])                                  # class k becomes relabel[k]
    sx2, sy2 = sx[:, order], relabel[sy[:, order]]
    assert torch.allclose(m.task_embedding(m.backbone(sx2[0]).unsqueeze(0), sy2, 3), t, atol=1e-5)
    logits2 = m.predict(sx2, sy2, qx, 3)
    assert torch.allclose(logits2[..., relabel], logits, atol=1e-4)    # same scores, columns relabelled


def test_starts_as_exactly_a_prototypical_network() -> None:
    """The last layers of phi and of the residual head start at zero: z = h, and the logits are a
    prototypical network's (with the same backbone weights) times the metric scale."""
    torch.manual_seed(0)
    m = methods.build("taskcond", (5,), backbone="mlp", mlp_hidden=[16], embedding=6, scale=2.0,
                      label_aware=True).eval()
    p = methods.build("protonet", (5,), backbone="mlp", mlp_hidden=[16], embedding=6,
                      distance="sqeuclidean").eval()                        # TADAM's squared distance
    p.backbone.load_state_dict(m.backbone.state_dict())
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(2, 6, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    sy = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    assert torch.allclose(m.predict(sx, sy, qx, 3), 2.0 * p.predict(sx, sy, qx, 3), atol=1e-5)
    zs = m.backbone(sx.flatten(0, 1)).view(2, 6, -1)
    zq = m.backbone(qx.flatten(0, 1)).view(2, 3, -1)
    assert torch.allclose(m.predict(sx, sy, qx, 3), -2.0 * distance(zq, prototypes(zs, sy, 3)), atol=1e-5)


def test_conditioning_depends_on_the_task() -> None:
    """Once phi is non-zero, the same query gets different embeddings in two different tasks, and the FiLM
    parameters follow z = h + g((1 + gamma) h + beta) exactly."""
    torch.manual_seed(0)
    m = methods.build("taskcond", (4,), backbone="mlp", mlp_hidden=[8], embedding=4).eval()
    with torch.no_grad():
        m.task_net[-1].weight.normal_(0, 1.0)
        m.head[-1].weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 3, 4, generator=g)
    t1, t2 = task_statistics(torch.randn(1, 5, 4, generator=g)), task_statistics(torch.randn(1, 5, 4, generator=g) * 3)
    z1, z2 = m.condition(h, t1), m.condition(h, t2)
    assert not torch.allclose(z1, z2, atol=1e-3)
    gamma, beta = m.film(t1)
    assert torch.allclose(z1, h + m.head((1 + gamma[:, None]) * h + beta[:, None]), atol=1e-6)


def test_shapes_gradients_and_embed() -> None:
    m = methods.build("taskcond", (1, 28, 28), hidden=8, label_aware=True)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(2, 6, 1, 28, 28, generator=g), torch.rand(2, 4, 1, 28, 28, generator=g)
    sy = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6)
    logits = m.predict(sx, sy, qx, 3)
    assert logits.shape == (2, 4, 3) and torch.isfinite(logits).all()
    loss, metrics = m.loss(Episode(sx, sy, qx, torch.tensor([[0, 1, 2, 0]] * 2), 3, 2, 1))
    loss.backward()
    assert set(metrics) == {"ce", "acc", "scale"}
    assert m.log_scale.grad is not None and m.head[-1].weight.grad.abs().sum() > 0
    assert m.task_net[-1].weight.grad is not None          # zero until the head leaves zero
    assert m.embed(torch.rand(7, 1, 28, 28)).shape == (7, 8)
    fixed = methods.build("taskcond", (1, 16, 16), learn_scale=False)
    assert "log_scale" in dict(fixed.named_buffers())
    with pytest.raises(FewshotError, match="scale must be positive"):
        methods.build("taskcond", (1, 16, 16), scale=0.0)
    with pytest.raises(FewshotError, match="task_hidden must be"):
        methods.build("taskcond", (1, 16, 16), task_hidden=-1)


def test_learns_held_out_classes() -> None:
    """300 episodes lift 5-way 1-shot accuracy on unseen classes far above chance (20%); the learned FiLM
    parameters are non-zero and differ between tasks."""
    m, before, after = learn_on_nuisance("taskcond", backbone="mlp", mlp_hidden=[64], embedding=32, label_aware=True)
    m.eval()
    with torch.no_grad():                  # the trained conditioning differs between two held-out tasks
        test_sampler = EpisodeSampler(make_nuisance().split_fraction(test=1 / 3, seed=0)[1], 5, 1, 5, seed=0)
        eps = [test_sampler.sample() for _ in range(2)]
        films = [torch.cat(m.film(m.task_embedding(m.backbone(e.support_x[0]).unsqueeze(0), e.support_y, 5)), -1)
                 for e in eps]
    assert float(films[0].abs().mean()) > 1e-3 and not torch.allclose(films[0], films[1], atol=1e-4)
    assert after.mean > 65 and after.mean > before.mean + 20, (before, after)


def test_cli_train_eval_predict_plot(capsys, tmp_path: Path, image_root: Path) -> None:
    cli_roundtrip(capsys, tmp_path / "t", image_root, "taskcond", "--hidden", "8", "--label-aware", "true",
                  shots=2, query=(0, 4))
