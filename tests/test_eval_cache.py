"""Evaluation from cached per-image features (fewshot.evaluate.feature_cache): the same episodes, scores,
losses, baseline and CSV as the plain path; chosen automatically only where it applies and pays."""
from __future__ import annotations

import importlib

import pytest
import torch

from fewshot import methods, tasks
from fewshot.data import mapped
from fewshot.data.dataset import ClassDataset
from fewshot.data.images import to_float
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.finetune import with_finetune
from fewshot.tta import with_tta

from conftest import adam_steps, make_synthetic

ev = importlib.import_module("fewshot.evaluate")     # the module (the package exports the function by its name)

OPTIONS = {"protonet": {"hidden": 16}, "simpleshot": {"hidden": 16},
           "hallucinate": {"hidden": 16, "gen_hidden": 48, "m": 3}}


@pytest.fixture(scope="module")
def ds16() -> ClassDataset:
    """12 classes x 10 images of 1x16x16 (120 images: 25 tasks of 5-way 1-shot 3-query hold 500)."""
    return make_synthetic(n_classes=12, per_class=10, size=16, seed=2)


def trained(name: str, ds) -> methods.Method:
    """``name`` after a few Adam steps, so batch norm's running statistics are not the initial ones."""
    torch.manual_seed(0)
    m = methods.build(name, ds.image_shape, **OPTIONS[name])
    adam_steps(m, EpisodeSampler(ds, 5, 1, 2, seed=0), 3)
    return m


def spy_cache(monkeypatch) -> list:
    """Records, for every evaluate() call, whether it scored from cached features."""
    seen = []
    real = ev.feature_cache

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out is not None)
        return out
    monkeypatch.setattr(ev, "feature_cache", spy)
    return seen


def test_episodes_record_the_dataset_index_of_every_row(ds16) -> None:
    s = EpisodeSampler(ds16, 5, 2, 3, seed=1)
    ep = s.sample(4)
    assert ep.support_index.shape == (4, 10) and ep.query_index.shape == (4, 15)
    data = to_float(ds16.data)
    assert torch.equal(ep.support_x, data[ep.support_index]) and torch.equal(ep.query_x, data[ep.query_index])
    assert torch.equal(s.take(ep.query_index), ep.query_x)
    # rows of way n come from class classes[n]; support and query images of a task are distinct
    assert torch.equal(ep.support_index // 10, ep.classes.repeat_interleave(2, dim=1))
    assert torch.equal(ep.query_index // 10, ep.classes.repeat_interleave(3, dim=1))
    both = torch.cat([ep.support_index, ep.query_index], 1)
    assert all(len(set(row.tolist())) == 25 for row in both)
    part = ep.tasks(slice(1, 3))
    assert torch.equal(part.support_index, ep.support_index[1:3]) and torch.equal(part.query_index, ep.query_index[1:3])
    assert torch.equal(ep.task(2).query_index, ep.query_index[2:3])
    moved = ep.to("cpu", torch.float64)
    assert moved.support_index.dtype == torch.long and torch.equal(moved.query_index, ep.query_index)
    # recording the indices draws nothing: the same seed gives the same episodes, then the same next one
    again = EpisodeSampler(ds16, 5, 2, 3, seed=1)
    assert torch.equal(again.sample(4).support_x, ep.support_x)
    assert torch.equal(again.generator.get_state(), s.generator.get_state())


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("chunk", [None, 7])
def test_cached_evaluation_gives_the_plain_numbers(name, chunk, ds16, tmp_path) -> None:
    m = trained(name, ds16)
    s = EpisodeSampler(ds16, 5, 1, 3, seed=4)
    plain = evaluate(m, s, 60, chunk=chunk, progress=False, cache=False, csv_path=tmp_path / "plain.csv")
    cached = evaluate(m, s, 60, chunk=chunk, progress=False, cache=True, csv_path=tmp_path / "cached.csv")
    assert cached.accuracies == plain.accuracies and cached.n == 60
    assert cached.loss == pytest.approx(plain.loss, abs=1e-5)
    assert cached.baseline == plain.baseline and cached.baseline_ci95 == plain.baseline_ci95
    assert (tmp_path / "cached.csv").read_text() == (tmp_path / "plain.csv").read_text()
    assert cached.summary() == plain.summary()
    assert 20 < plain.mean < 100 and m.training         # a real score; the training mode is restored


def test_cached_predictions_equal_the_plain_predictions(ds16) -> None:
    """The logits themselves: predict on the episode images vs predict_features on the cached rows."""
    for name in OPTIONS:
        m = trained(name, ds16).eval()
        s = EpisodeSampler(ds16, 5, 2, 3, seed=7)
        feats = ev.feature_cache(m, s, 25, cache=True, progress=False)
        assert feats.shape[0] == ds16.num_images
        ep = s.sample(25)
        with torch.no_grad():
            a = m.predict(ep.support_x, ep.support_y, ep.query_x, 5)
            b = m.predict_features(feats[ep.support_index], ep.support_y, feats[ep.query_index], 5)
        assert torch.equal(a.argmax(-1), b.argmax(-1)), name
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name


def test_bf16_and_memory_mapped_data_give_the_same_numbers(ds16, tmp_path) -> None:
    m = trained("protonet", ds16)
    s = EpisodeSampler(ds16, 5, 1, 3, seed=4)
    plain = evaluate(m, s, 50, precision="bf16", progress=False, cache=False)
    cached = evaluate(m, s, 50, precision="bf16", progress=False, cache=True)
    assert cached.accuracies == plain.accuracies and cached.loss == pytest.approx(plain.loss, abs=1e-5)
    path = tmp_path / "x.fsmm"
    mapped.write_cache(path, "fp", mapped.plan_of(ds16))
    on_file = EpisodeSampler(mapped.open_cache(path, "fp"), 5, 1, 3, seed=4)
    assert on_file.mapped
    fp32 = evaluate(m, s, 50, progress=False, cache=False)
    from_file = evaluate(m, on_file, 50, progress=False, cache=True)
    assert from_file.accuracies == fp32.accuracies and from_file.baseline == fp32.baseline


def test_auto_mode_caches_only_when_it_pays(monkeypatch) -> None:
    ds = make_synthetic(n_classes=12, per_class=60, size=16, seed=3)      # 720 images; a task holds 20
    m = trained("protonet", ds)
    s = EpisodeSampler(ds, 5, 1, 3, seed=0)
    seen = spy_cache(monkeypatch)
    few = evaluate(m, s, 20, progress=False)          # 25 tasks drawn: 500 images < 720
    many = evaluate(m, s, 40, progress=False)         # 50 tasks: 1000 images > 720
    assert seen == [False, True]
    assert many.accuracies[:20] == few.accuracies     # the same episodes either way
    assert evaluate(m, s, 40, progress=False, cache=False).accuracies == many.accuracies
    assert evaluate(m, s, 20, progress=False, cache=True).accuracies == few.accuracies   # True: even unpaid
    assert seen[2:] == [False, True]
    monkeypatch.setenv("FEWSHOT_EVAL_CACHE", "0")     # the environment turns the automatic mode off
    evaluate(m, s, 40, progress=False)
    evaluate(m, s, 40, progress=False, cache=True)
    assert seen[4:] == [False, True]
    monkeypatch.setenv("FEWSHOT_EVAL_CACHE", "maybe")
    with pytest.raises(FewshotError, match=r"^\$FEWSHOT_EVAL_CACHE must be 0 .* got 'maybe'$"):
        evaluate(m, s, 40, progress=False)
    monkeypatch.delenv("FEWSHOT_EVAL_CACHE")
    dim = m.eval().feature_vectors(s.take(torch.arange(2))).shape[1]
    monkeypatch.setattr(ev, "CACHE_BYTES", 720 * dim * 4)                   # the features just fit (as fp32)
    evaluate(m, s, 40, progress=False)
    monkeypatch.setattr(ev, "CACHE_BYTES", 720 * dim * 4 - 1)               # ... and do not
    evaluate(m, s, 40, progress=False)
    assert seen[6:] == [True, False]


def test_embedding_reads_every_image_once_in_plain_sized_passes(ds16) -> None:
    m = trained("protonet", ds16)
    sizes = []
    real = m.feature_vectors

    def counting(x):
        sizes.append(x.shape[0])
        return real(x)
    m.feature_vectors = counting
    s = EpisodeSampler(ds16, 5, 1, 3, seed=4)
    evaluate(m, s, 60, progress=False, cache=False)
    assert sum(sizes) == 75 * 20                      # 3 batches of 25 tasks x 20 images
    sizes.clear()
    evaluate(m, s, 60, progress=False, chunk=2)
    assert sizes == [40, 40, 40]                      # 120 images in passes of 2 tasks' worth (40)


def test_what_depends_on_more_than_each_image_takes_the_plain_path(ds16, monkeypatch) -> None:
    m = trained("protonet", ds16)
    seen = spy_cache(monkeypatch)
    s = EpisodeSampler(ds16, 5, 1, 3, seed=4)
    jitter = EpisodeSampler(ds16, 5, 1, 3, seed=4, transform=lambda x, g: x + 0.01 * torch.rand(x.shape, generator=g))
    semi = EpisodeSampler(ds16, 5, 1, 3, seed=4, unlabeled=1)
    for method, sampler in ((with_tta(m, 1), s), (with_finetune(m, 1, 1e-3), s), (m, jitter), (m, semi),
                            (methods.build("matching", ds16.image_shape, hidden=8), s)):
        evaluate(method, sampler, 30, progress=False, baseline=False)
    evaluate(m, s, 30, progress=False)
    assert seen == [False] * 5 + [True]


@pytest.mark.parametrize("make, message", [
    (lambda m, s, ds: (with_tta(m, 1), s), "test-time augmentation"),
    (lambda m, s, ds: (with_finetune(m, 1, 1e-3), s), "test-time fine-tuning"),
    (lambda m, s, ds: (m, EpisodeSampler(ds, 5, 1, 3, transform=lambda x, g: x)), "transforms each episode's images"),
    (lambda m, s, ds: (m, EpisodeSampler(ds, 5, 1, 3, unlabeled=1)), "unlabelled examples"),
    (lambda m, s, ds: (methods.build("relation", ds.image_shape), s), "method relation does not predict from"),
    (lambda m, s, ds: (methods.build("semisup", ds.image_shape, hidden=8), s), "method semisup does not predict"),
    (lambda m, s, ds: (methods.build("protonet", (1,), backbone="mlp"), tasks.make("sine", 5, 5, seed=0)),
     "not an EpisodeSampler"),
])
def test_cache_true_where_impossible_is_a_one_line_error(make, message, ds16) -> None:
    m = methods.build("protonet", ds16.image_shape, hidden=8)
    method, sampler = make(m, EpisodeSampler(ds16, 5, 1, 3), ds16)
    with pytest.raises(FewshotError, match="cache=True: cannot evaluate from cached features") as e:
        evaluate(method, sampler, 5, progress=False, cache=True)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_attributes_and_batch_statistics_refuse_the_cache(ds16) -> None:
    attrs = torch.rand(len(ds16), 4)
    with_attrs = ClassDataset.from_class_tensors([ds16.images(c) for c in range(len(ds16))], ds16.names,
                                                 attributes=attrs)
    m = methods.build("protonet", ds16.image_shape, hidden=8)
    assert "class attributes" in ev.cache_refusal(m, EpisodeSampler(with_attrs, 5, 1, 3))
    assert ev.cache_refusal(m, EpisodeSampler(ds16, 5, 1, 3)) is None
    m.backbone.features[1] = torch.nn.BatchNorm2d(8, track_running_stats=False)
    assert "batch-norm layer without running statistics" in ev.cache_refusal(m, EpisodeSampler(ds16, 5, 1, 3))


def test_which_methods_score_features(ds16) -> None:
    shape = ds16.image_shape
    for name in OPTIONS:
        assert methods.build(name, shape, **OPTIONS[name]).scores_features, name
    # semisup: a ProtoNet that predicts otherwise (from unlabelled examples)
    for name, kw in (("matching", {}), ("relation", {}), ("maml", {"outputs": 5}), ("semisup", {})):
        assert not methods.build(name, shape, **kw).scores_features, name
    m = methods.build("protonet", shape, hidden=8)
    m.predict = lambda *a: None                      # a predict replaced on the instance is honoured
    assert not m.scores_features
    with pytest.raises(FewshotError, match="method matching does not predict from per-image features"):
        methods.build("matching", shape).predict_features(None, None, None, 5)
