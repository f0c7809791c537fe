"""Data hallucination (Wang et al. 2018 style): M = 0 is a prototypical network, M generated features per
class seeded from that class, hand-computed prototypes, deterministic evaluation, end-to-end gradients,
learning on held-out classes, and train -> eval -> predict -> plot (with the real-vs-hallucinated t-SNE)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import learn_on_nuisance
from fewshot import methods
from fewshot.episodes import Episode
from fewshot.errors import FewshotError
from fewshot.methods.hallucinate import Hallucinator, hallucination_seeds

from test_cli import cli_roundtrip, run_cli


def _pair(shape, **options):
    """A hallucination network with M = 0 and a prototypical network sharing its backbone weights."""
    torch.manual_seed(0)
    h = methods.build("hallucinate", shape, m=0, gen_hidden=32, **options)
    p = methods.build("protonet", shape, **{"distance": h.config.distance, **options})    # the same distance
    p.backbone.load_state_dict(h.backbone.state_dict())
    return h, p


@pytest.mark.parametrize("shape, options", [((1, 16, 16), {"hidden": 8}),
                                            ((6,), {"mlp_hidden": [16], "embedding": 4, "distance": "cosine"})])
def test_m_zero_is_exactly_a_prototypical_network(shape, options) -> None:
    h, p = _pair(shape, **options)
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.rand(2, 6, *shape, generator=g), torch.rand(2, 5, *shape, generator=g)
    sy = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    for mode in (True, False):                       # batch statistics and running statistics
        h.train(mode), p.train(mode)
        assert torch.equal(h.predict(sx, sy, qx, 3), p.predict(sx, sy, qx, 3))
    ep = Episode(sx, sy, qx, torch.tensor([[0, 1, 2, 0, 1]] * 2), 3, 2, 1)
    h.train(), p.train()
    assert float(h.loss(ep)[0].detach()) == pytest.approx(float(p.loss(ep)[0].detach()), rel=1e-6)


def test_m_features_per_class_seeded_from_that_class() -> None:
    m = methods.build("hallucinate", (3,), backbone="mlp", embedding=3, m=7, gen_hidden=16).eval()
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 6, 3, generator=g)
    ys = torch.tensor([[0, 1, 2, 0, 1, 2], [1, 1, 1, 0, 2, 0]])           # unequal shots in task 1
    fake, fy = m.hallucinate(zs, ys, 3)
    assert fake.shape == (2, 21, 3) and fy.tolist() == [[0] * 7 + [1] * 7 + [2] * 7] * 2
    idx = hallucination_seeds(ys, 3, 500, torch.Generator().manual_seed(0))
    assert idx.shape == (2, 1500)
    for b in range(2):
        for k in range(3):
            chosen = set(idx[b, k * 500:(k + 1) * 500].tolist())
            assert chosen == {i for i in range(6) if ys[b, i] == k}      # every real example of k, nothing else
    with pytest.raises(FewshotError, match="at least one support example"):
        hallucination_seeds(ys, 4, 2)


def test_prototypes_average_real_and_hallucinated_by_hand() -> None:
    """With G replaced by (seed, noise) -> seed + 1 and the identity as embedding, the 1-shot prototype of a
    class with real feature x is (x + M (x + 1)) / (1 + M)."""
    M = 3
    m = methods.build("hallucinate", (2,), backbone="mlp", embedding=2, m=M, gen_hidden=8).eval()
    m.backbone = torch.nn.Identity()

    class PlusOne(torch.nn.Module):
        def forward(self, seed, noise):
            return seed + 1
    m.generator = PlusOne()
    sx = torch.tensor([[[0., 0.], [4., -2.]]])
    qx = torch.tensor([[[1., 1.], [3., 0.]]])
    logits = m.predict(sx, torch.tensor([[0, 1]]), qx, 2)
    hand = []
    for q in qx[0].tolist():
        row = []
        for x in sx[0].tolist():
            c = [(xi + M * (xi + 1)) / (1 + M) for xi in x]
            row.append(-sum((qi - ci) ** 2 for qi, ci in zip(q, c)))
        hand.append(row)
    assert torch.allclose(logits, torch.tensor([hand]), atol=1e-6)


def test_identity_init_passes_the_seed_through() -> None:
    """gen_init identity: with the randomly initialised part of the output layer zeroed, G(x, z) = x for any
    noise z and features of either sign."""
    G = Hallucinator(5, hidden=16, dropout=0.0, init="identity")
    with torch.no_grad():
        G.net[6].weight[:, 10:] = 0
    x = torch.randn(4, 5)
    assert torch.allclose(G(x, torch.randn(4, 5)), x, atol=1e-6)
    with pytest.raises(FewshotError, match="gen_hidden >= 2 x the feature size"):
        Hallucinator(5, hidden=8, init="identity")
    assert Hallucinator(5, hidden=8, init="auto").net[0].weight.shape == (8, 10)     # auto falls back to random


def test_evaluation_is_deterministic_training_is_random() -> None:
    m = methods.build("hallucinate", (1, 16, 16), hidden=8, gen_hidden=32, m=4)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(1, 6, 1, 16, 16, generator=g), torch.rand(1, 3, 1, 16, 16, generator=g)
    sy = torch.tensor([[0, 0, 1, 1, 2, 2]])
    m.eval()
    a = m.predict(sx, sy, qx, 3)
    torch.rand(10)                                          # the global RNG does not matter
    assert torch.equal(a, m.predict(sx, sy, qx, 3))
    m.config.eval_seed = 5
    assert not torch.equal(a, m.predict(sx, sy, qx, 3))
    m.train()
    assert not torch.equal(m.predict(sx, sy, qx, 3), m.predict(sx, sy, qx, 3))


def test_generator_is_trained_by_the_classification_loss() -> None:
    m = methods.build("hallucinate", (1, 16, 16), hidden=8, gen_hidden=32, m=2)
    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.rand(2, 4, 1, 16, 16, generator=g), torch.tensor([[0, 0, 1, 1]] * 2),
                 torch.rand(2, 4, 1, 16, 16, generator=g), torch.tensor([[0, 1, 0, 1]] * 2), 2, 2, 2)
    loss, metrics = m.loss(ep)
    loss.backward()
    assert set(metrics) == {"ce", "acc"}
    assert all(p.grad is not None for p in m.generator.parameters())
    assert float(m.generator.net[0].weight.grad.abs().sum()) > 0


def test_option_errors() -> None:
    for kw, msg in [({"m": -1}, "must be at least 0"), ({"gen_init": "xavier"}, "unknown gen_init"),
                    ({"dropout": 1.0}, "dropout must be"), ({"distance": "l1"}, "unknown distance"),
                    ({"gen_hidden": 0}, "gen_hidden must be")]:
        with pytest.raises(FewshotError, match=msg):
            methods.build("hallucinate", (1, 16, 16), **kw)
    m = methods.build("hallucinate", (1, 28, 28))
    assert m.generator.net[0].weight.shape == (2400, 128) and m.generator.net[6].weight.shape == (64, 2400)


def test_learns_held_out_classes() -> None:
    """300 episodes with M = 5 hallucinations per class lift 5-way 1-shot accuracy on unseen classes far
    above chance (20%) and the untrained network."""
    m, before, after = learn_on_nuisance("hallucinate", backbone="mlp", mlp_hidden=[64], embedding=32, m=5,
                      gen_hidden=128, dropout=0.2)
    assert after.mean > 65 and after.mean > before.mean + 20, (before, after)


def test_cli_train_eval_predict_plot(capsys, tmp_path: Path, image_root: Path) -> None:
    run = tmp_path / "h"
    out = cli_roundtrip(capsys, run, image_root, "hallucinate", "--hidden", "8", "--m", "4", "--gen-hidden", "32",
                        query=(2, 1))
    pic = run / "plots" / "tsne_hallucinated.png"
    assert str(pic) in out and pic.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pic.stat().st_size > 10_000
    evals = [run_cli(capsys, "eval", run, "--ways", "3", "--shots", "2", "--queries", "2", "--episodes", "10",
                     "--no-progress") for _ in range(2)]
    assert evals[0][0] == 0 and evals[0][1] == evals[1][1]                  # deterministic evaluation
