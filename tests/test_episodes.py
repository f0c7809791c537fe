"""EpisodeSampler: shapes, labels, class/image invariants, seeding, exact resume, errors, transforms."""
from __future__ import annotations

import pytest
import torch

from conftest import image_bytes_index, make_synthetic
from fewshot.augment import RandomAffine, build_transform
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import Episode, EpisodeSampler, episodes
from fewshot.errors import FewshotError


def _check_episode(ep: Episode, ds: ClassDataset, index: dict) -> None:
    """Every image of way n comes from class ep.classes[b, n]; no image appears twice in a task."""
    B, N, K, Q = ep.batch, ep.ways, ep.shots, ep.queries
    for b in range(B):
        cls = ep.classes[b].tolist()
        assert len(set(cls)) == N                                  # N distinct classes per task
        assert all(0 <= c < len(ds) for c in cls)
        used = set()
        for n in range(N):
            imgs = list(ep.support_x[b, n * K:(n + 1) * K]) + list(ep.query_x[b, n * Q:(n + 1) * Q])
            for im in imgs:
                c, i = index[bytes(im.contiguous().numpy())]
                assert c == cls[n]
                assert (c, i) not in used
                used.add((c, i))
        assert len(used) == N * (K + Q)


@pytest.mark.parametrize("B, N, K, Q", [(1, 5, 1, 5), (4, 5, 1, 2), (3, 3, 5, 5), (2, 12, 2, 0)])
def test_shapes_labels_and_content(synthetic: ClassDataset, B: int, N: int, K: int, Q: int) -> None:
    s = EpisodeSampler(synthetic, N, K, Q, batch=B, seed=1, dtype=None)
    index = image_bytes_index(synthetic)
    for _ in range(3):
        ep = s.sample()
        assert ep.support_x.shape == (B, N * K, 1, 12, 12) and ep.query_x.shape == (B, N * Q, 1, 12, 12)
        assert ep.support_y.shape == (B, N * K) and ep.query_y.shape == (B, N * Q)
        assert ep.classes.shape == (B, N)
        assert ep.support_x.dtype == torch.uint8                   # dtype None keeps uint8
        assert ep.support_y.dtype == torch.long
        assert (ep.ways, ep.shots, ep.queries, ep.batch) == (N, K, Q, B)
        expect_s = torch.arange(N).repeat_interleave(K)
        expect_q = torch.arange(N).repeat_interleave(Q)
        for b in range(B):                                        # labels 0..N-1 in class blocks
            assert torch.equal(ep.support_y[b], expect_s) and torch.equal(ep.query_y[b], expect_q)
        _check_episode(ep, synthetic, index)


def test_float_images_are_scaled(synthetic: ClassDataset) -> None:
    a = EpisodeSampler(synthetic, 5, 2, 3, seed=4, dtype=None).sample()
    for kwargs in ({}, {"float_cache_bytes": 0}):                  # pre-converted or converted per episode
        f = EpisodeSampler(synthetic, 5, 2, 3, seed=4, **kwargs).sample()
        assert f.support_x.dtype == torch.float32
        assert torch.allclose(f.support_x, a.support_x.float() / 255)
        assert torch.allclose(f.query_x, a.query_x.float() / 255)
    d = EpisodeSampler(synthetic, 5, 2, 3, seed=4, dtype=torch.float64).sample()
    assert d.query_x.dtype == torch.float64


def test_tasks_in_a_batch_differ(synthetic: ClassDataset) -> None:
    ep = EpisodeSampler(synthetic, 5, 1, 2, batch=8, seed=0).sample()
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(ep.support_x[i], ep.support_x[j])
    # the classes behind label 0 vary across tasks, so label order carries no information
    assert len(set(ep.classes[:, 0].tolist())) > 1


def test_same_seed_same_episodes(synthetic: ClassDataset) -> None:
    a = EpisodeSampler(synthetic, 5, 2, 3, batch=2, seed=7)
    b = EpisodeSampler(synthetic, 5, 2, 3, batch=2, seed=7)
    c = EpisodeSampler(synthetic, 5, 2, 3, batch=2, seed=8)
    for _ in range(4):
        ea, eb, ec = a.sample(), b.sample(), c.sample()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
        assert torch.equal(ea.classes, eb.classes)
        assert not torch.equal(ea.support_x, ec.support_x)
    # consecutive episodes differ
    assert not torch.equal(a.sample().support_x, a.sample().support_x)


def test_state_dict_continues_the_stream(synthetic: ClassDataset) -> None:
    aff = RandomAffine()
    a = EpisodeSampler(synthetic, 4, 2, 2, batch=3, seed=5, transform=aff)
    for _ in range(3):
        a.sample()
    state = a.state_dict()
    expected = [a.sample() for _ in range(3)]
    b = EpisodeSampler(synthetic, 4, 2, 2, batch=3, seed=99, transform=aff)
    b.load_state_dict(state)
    for e in expected:
        got = b.sample()
        assert torch.equal(got.support_x, e.support_x) and torch.equal(got.query_x, e.query_x)
        assert torch.equal(got.classes, e.classes)
    # the state survives a save/load through torch (as in checkpoints)
    assert state["seed"] == 5 and isinstance(state["generator"], torch.Tensor)


def test_sample_with_other_batch_size(synthetic: ClassDataset) -> None:
    s = episodes(synthetic, 3, 1, queries=1, batch=2)
    assert s.sample().batch == 2 and s.sample(5).batch == 5
    it = iter(s)
    assert next(it).support_x.shape[0] == 2
    assert "3-way 1-shot" in repr(s)


def test_task_slicing_and_to(synthetic: ClassDataset) -> None:
    ep = EpisodeSampler(synthetic, 3, 1, 2, batch=4, seed=0, dtype=None).sample()
    t = ep.task(2)
    assert t.batch == 1 and torch.equal(t.support_x[0], ep.support_x[2]) and torch.equal(t.classes[0], ep.classes[2])
    f = ep.to(dtype=torch.float32)
    assert f.support_x.dtype == torch.float32 and f.support_y.dtype == torch.long


def test_non_uniform_class_sizes() -> None:
    counts = [3, 9, 4, 6, 3, 12, 5]
    parts = [make_synthetic(1, n, seed=s, groups=0).data for s, n in enumerate(counts)]
    ds = ClassDataset.from_class_tensors(parts, [f"k{i}" for i in range(len(counts))])
    index = image_bytes_index(ds)
    s = EpisodeSampler(ds, 5, 1, 2, batch=6, seed=3, dtype=None)
    assert not s.uniform
    seen_small = set()
    for _ in range(20):
        ep = s.sample()
        _check_episode(ep, ds, index)
        for b in range(ep.batch):
            for n, c in enumerate(ep.classes[b].tolist()):
                if c == 0:   # the 3-image class: all of its images are used, in some order
                    imgs = [ep.support_x[b, n]] + list(ep.query_x[b, 2 * n:2 * n + 2])
                    seen_small.add(frozenset(index[bytes(i.contiguous().numpy())][1] for i in imgs))
    assert seen_small == {frozenset({0, 1, 2})}


def test_too_many_ways(synthetic: ClassDataset) -> None:
    with pytest.raises(FewshotError) as e:
        EpisodeSampler(synthetic, 13, 1, 1)
    msg = str(e.value)
    assert "13 ways" in msg and "12 classes" in msg and "\n" not in msg


def test_class_too_small_names_the_class() -> None:
    parts = [make_synthetic(1, n, seed=s, groups=0).data for s, n in enumerate([10, 10, 4, 10, 3])]
    ds = ClassDataset.from_class_tensors(parts, ["a", "b", "tiny", "c", "tinier"])
    with pytest.raises(FewshotError) as e:
        EpisodeSampler(ds, 3, 2, 3)
    msg = str(e.value)
    assert "'tiny'" in msg and "4 images" in msg and "2 shots + 3 queries = 5" in msg
    assert "2 class(es) too small" in msg and "\n" not in msg
    EpisodeSampler(ds, 3, 1, 2)        # 3 per class fits every class


@pytest.mark.parametrize("kwargs, match", [
    (dict(ways=0), "ways must be at least 1"),
    (dict(shots=0), "shots must be at least 1"),
    (dict(queries=-1), "queries must be at least 0"),
    (dict(batch=0), "batch must be at least 1"),
])
def test_bad_arguments(synthetic: ClassDataset, kwargs, match) -> None:
    args = dict(ways=5, shots=1, queries=1)
    args.update(kwargs)
    with pytest.raises(FewshotError, match=match):
        EpisodeSampler(synthetic, **args)


def test_transform_is_applied_and_seeded(synthetic: ClassDataset) -> None:
    plain = EpisodeSampler(synthetic, 5, 2, 3, batch=2, seed=11).sample()
    mk = lambda: EpisodeSampler(synthetic, 5, 2, 3, batch=2, seed=11,   # noqa: E731
                                transform=RandomAffine(degrees=20, translate=0.1))
    a, b = mk().sample(), mk().sample()
    assert a.support_x.shape == plain.support_x.shape and a.query_x.shape == plain.query_x.shape
    assert a.support_x.dtype == torch.float32
    assert torch.equal(a.classes, plain.classes)                  # the images chosen are the same ...
    assert not torch.allclose(a.support_x, plain.support_x)     # ... but transformed
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert torch.equal(a.support_y, plain.support_y)
    c = EpisodeSampler(synthetic, 5, 2, 3, batch=2, seed=12, transform=RandomAffine()).sample()
    assert not torch.equal(c.support_x, a.support_x)


def test_random_affine_identity_and_shape() -> None:
    x = torch.rand(2, 3, 1, 12, 12)
    g = torch.Generator().manual_seed(0)
    ident = RandomAffine(degrees=0, scale=(1.0, 1.0), shear=0, translate=0)
    assert torch.allclose(ident(x, g), x, atol=1e-5)
    y = RandomAffine()(x, g)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert build_transform(None) is None and build_transform({}) is None
    assert build_transform({"affine": False}) is None
    assert isinstance(build_transform({"affine": True}), RandomAffine)
    assert build_transform({"affine": {"degrees": 5}}).degrees == 5
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_transform({"elastic": True})
