"""Memory-mapped data sets: the cache file (atomic, checked, rebuilt), reading without loading the set whole,
and episodes equal to those of the same set in memory."""
import os

import numpy as np
import pytest
import torch

from fewshot.data import mapped
from fewshot.data.dataset import ClassDataset, cached, memory_mapping, mmap_mode
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError


def _dataset(classes=7, per=9, shape=(3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = [per + (c % 3) for c in range(classes)]           # uneven classes
    data = torch.randint(0, 256, (sum(counts), *shape), generator=g, dtype=torch.uint8)
    groups = ["train"] * (classes - 3) + ["val", "test", "test"]
    return ClassDataset(data, counts, [f"c{i}" for i in range(classes)], groups, source="synthetic")


def _mapped(tmp_path, ds, name="x.fsmm", **kw):
    path = tmp_path / name
    mapped.write_cache(path, "fp", mapped.plan_of(ds))
    return mapped.open_cache(path, "fp", **kw), path


def test_file_layout_and_round_trip(tmp_path):
    ds = _dataset()
    m, path = _mapped(tmp_path, ds)
    meta, offset = mapped.read_header(path)
    assert offset % mapped.ALIGN == 0 and meta["format"] == mapped.FORMAT_VERSION
    assert meta["shape"] == list(ds.data.shape) and meta["fingerprint"] == "fp"
    assert os.path.getsize(path) == offset + ds.data.numel()
    raw = np.fromfile(path, dtype=np.uint8, offset=offset).reshape(ds.data.shape)
    assert torch.equal(torch.from_numpy(raw), ds.data)        # plain C-order uint8 after the header
    assert m.memory_mapped and not ds.memory_mapped
    assert m.names == ds.names and m.groups == ds.groups and torch.equal(m.counts, ds.counts)
    assert m.num_images == ds.num_images and m.image_shape == ds.image_shape
    for c in range(len(ds)):
        assert torch.equal(m.images(c), ds.images(c))
    assert torch.equal(m.data, ds.data)
    assert "memory-mapped" in repr(m)


def test_gather_with_small_windows_bounds_what_is_mapped(tmp_path):
    ds = _dataset(classes=12, per=20)
    row = int(np.prod(ds.image_shape))
    m, _ = _mapped(tmp_path, ds, resident_bytes=3 * 4 * row)
    store = m._data
    store.__init__(store.path, store.offset, store.shape, resident_bytes=3 * 4 * row, window_bytes=4 * row)
    assert store.rows_per_window == 4 and store.max_windows == 3
    idx = torch.randint(0, ds.num_images, (500,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(store.gather(idx), ds.data[idx])       # any order, repeats, across many windows
    assert len(store._windows) <= 3
    store.release()
    assert len(store._windows) == 0
    with pytest.raises(IndexError):
        store.gather([ds.num_images])


def test_subsets_splits_and_relabel_only_reindex(tmp_path):
    ds = _dataset(classes=10)
    m, _ = _mapped(tmp_path, ds)
    for a, b in zip(m.split_fraction(test=0.3, seed=4), ds.split_fraction(test=0.3, seed=4)):
        assert a.memory_mapped and a.rows is not None
        assert a.names == b.names and torch.equal(a.data, b.data)
        sub_a, sub_b = a.subset([2, 0]), b.subset([2, 0])      # a subset of a subset composes the rows
        assert torch.equal(sub_a.data, sub_b.data)
    tr, va, te = m.split_by_group(test=["test"], val=["val"])
    assert torch.equal(te.data, ds.split_by_group(test=["test"], val=["val"])[2].data)
    labels = torch.arange(ds.num_images) % 4
    assert torch.equal(m.relabel(labels).data, ds.relabel(labels).data)
    with pytest.raises(FewshotError, match="--rotations"):
        m.with_rotations()


def test_sampler_gives_the_same_episodes_without_loading_the_set(tmp_path, monkeypatch):
    ds = _dataset(classes=9, per=12)
    m, _ = _mapped(tmp_path, ds)
    ref = EpisodeSampler(ds, 4, 2, 3, batch=3, seed=5, unlabeled=1, distractors=1)
    samp = EpisodeSampler(m, 4, 2, 3, batch=3, seed=5, unlabeled=1, distractors=1)
    assert samp.mapped and samp.data is None and "memory-mapped" in repr(samp)
    # the whole set is never read: only take() of an episode's rows
    monkeypatch.setattr(ClassDataset, "data", property(lambda self: pytest.fail("read the whole set")))
    for _ in range(3):
        a, b = ref.sample(), samp.sample()
        assert a.support_x.dtype == b.support_x.dtype == torch.float32
        for k in ("support_x", "query_x", "support_y", "query_y", "classes"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert torch.equal(a.extra["unlabeled_x"], b.extra["unlabeled_x"])
    raw = EpisodeSampler(m, 3, 1, 1, seed=0, dtype=None).sample()
    assert raw.support_x.dtype == torch.uint8


@pytest.mark.parametrize("damage", ["truncate", "source", "format", "garbage"])
def test_bad_cache_is_detected_and_rebuilt_with_a_message(tmp_path, capfd, damage):
    src = tmp_path / "src.bin"
    src.write_bytes(b"v1")
    ds = _dataset()
    builds = []

    def build():
        builds.append(1)
        return ds

    first = cached([src], {"p": 1}, build, tag="t", cache=tmp_path / "c", mmap=True)
    assert first.memory_mapped and len(builds) == 1
    (path,) = list((tmp_path / "c").glob("t-*.fsmm"))
    assert not list((tmp_path / "c").glob("*.tmp*"))           # the temporary file was renamed away
    again = cached([src], {"p": 1}, build, tag="t", cache=tmp_path / "c", mmap=True)
    assert len(builds) == 1 and torch.equal(again.data, ds.data)   # reused, not rebuilt
    capfd.readouterr()
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
        why = "truncated"
    elif damage == "source":
        src.write_bytes(b"v2 longer")                          # same place, another version of the source
        why = "another version of the source"
    elif damage == "format":
        data = path.read_bytes()
        assert data[16:29] == b'{"format": 1,'
        path.write_bytes(data[:16] + b'{"format": 9,' + data[29:])   # same length: only the version differs
        why = "format version 9"
    else:
        path.write_bytes(b"not a cache at all, just bytes")
        why = "not a fewshot cache"
    rebuilt = cached([src], {"p": 1}, build, tag="t", cache=tmp_path / "c", mmap=True)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(builds) == 2 and torch.equal(rebuilt.data, ds.data)
    assert len(err) == 1 and err[0].startswith("fewshot: rebuilding the memory-mapped cache") and why in err[0]
    mapped.read_header(path)                                   # valid again


def test_interrupted_write_leaves_no_file(tmp_path):
    ds = _dataset()
    plan = mapped.plan_of(ds)
    half = mapped.Plan(plan.shape, plan.counts, plan.names, plan.groups, plan.preprocess, plan.source,
                       lambda write: write(ds.data[:3].numpy()))
    with pytest.raises(ValueError, match="3 of the planned"):
        mapped.write_cache(tmp_path / "x.fsmm", "fp", half)
    assert list(tmp_path.iterdir()) == []


def test_auto_maps_above_the_threshold_only(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"v1")
    ds = _dataset()
    small = cached([src], {}, lambda: ds, tag="a", cache=tmp_path / "c1")
    assert not small.memory_mapped                               # default threshold 2 GiB
    monkeypatch.setenv("FEWSHOT_MMAP_BYTES", str(ds.data.numel() - 1))
    big = cached([src], {}, lambda: ds, tag="a", cache=tmp_path / "c2")
    assert big.memory_mapped and torch.equal(big.data, ds.data)
    with memory_mapping(False):
        assert not cached([src], {}, lambda: ds, tag="b", cache=tmp_path / "c3").memory_mapped
    with memory_mapping(True):
        monkeypatch.delenv("FEWSHOT_MMAP_BYTES")
        assert cached([src], {}, lambda: ds, tag="b", cache=tmp_path / "c4").memory_mapped
    assert mmap_mode("false") is False and mmap_mode("auto") == "auto"
    with pytest.raises(FewshotError, match="--mmap"):
        mmap_mode("sometimes")
