"""ClassDataset: construction, subsets, class splits, rotations, relabelling, persistence and caching."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from conftest import make_synthetic
from fewshot.config import RunConfig, parse_split
from fewshot.data.dataset import ClassDataset, cached
from fewshot.data.images import Preprocess
from fewshot.errors import FewshotError
from fewshot.run import split_dataset


def _u8(*shape) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------ construction
def test_layout(synthetic: ClassDataset) -> None:
    ds = synthetic
    assert len(ds) == 12 and ds.num_images == 120 and ds.image_shape == (1, 12, 12)
    assert ds.counts.tolist() == [10] * 12
    assert ds.offsets.tolist() == list(range(0, 120, 10))
    assert ds.labels().tolist() == [c for c in range(12) for _ in range(10)]
    assert torch.equal(ds.images(3), ds.data[30:40])
    assert ds.group_names() == ["g0", "g1", "g2"]
    assert ds.preprocess.size == (12, 12) and ds.preprocess.channels == 1
    assert "12 classes" in repr(ds)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=torch.zeros(4, 1, 2, 2, dtype=torch.float64)), "uint8 or float32"),
    (dict(data=_u8(4, 2, 2)), "uint8"),
    (dict(counts=[2, 1]), "sum to 3"),
    (dict(names=["a"]), "1 names for 2 classes"),
    (dict(names=["a", "a"]), "unique"),
    (dict(groups=["x"]), "1 groups for 2 classes"),
])
def test_construction_errors(kwargs, match) -> None:
    args = dict(data=_u8(4, 1, 2, 2), counts=[2, 2], names=["a", "b"], groups=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ClassDataset(**args)


def test_empty_class_is_a_user_error() -> None:
    with pytest.raises(FewshotError, match="class 'b' has no images"):
        ClassDataset(_u8(4, 1, 2, 2), [4, 0], ["a", "b"])
    with pytest.raises(FewshotError, match="class 'b' has no images"):
        ClassDataset.from_class_tensors([_u8(2, 1, 2, 2), _u8(0, 1, 2, 2)], ["a", "b"])


def test_subset(synthetic: ClassDataset) -> None:
    sub = synthetic.subset([5, 2, 9])
    assert sub.names == ["c05", "c02", "c09"]
    assert sub.groups == ["g2", "g2", "g0"]
    for i, c in enumerate([5, 2, 9]):
        assert torch.equal(sub.images(i), synthetic.images(c))
    with pytest.raises(FewshotError, match="no classes"):
        synthetic.subset([])


# ------------------------------------------------------------------------------------------ splits
def test_split_by_group(synthetic: ClassDataset) -> None:
    train, test = synthetic.split_by_group(["g1"])
    assert set(test.groups) == {"g1"} and "g1" not in set(train.groups)
    assert not set(train.names) & set(test.names)
    assert sorted(train.names + test.names) == synthetic.names
    train, val, test = synthetic.split_by_group(["g1"], val=["g2"])
    assert set(train.groups) == {"g0"} and set(val.groups) == {"g2"} and set(test.groups) == {"g1"}
    assert len(train) + len(val) + len(test) == 12


def test_split_by_group_errors(synthetic: ClassDataset) -> None:
    with pytest.raises(FewshotError, match="unknown group 'Klingon'") as e:
        synthetic.split_by_group(["Klingon"])
    assert "g0, g1, g2" in str(e.value)
    with pytest.raises(FewshotError, match="both test and val"):
        synthetic.split_by_group(["g1"], val=["g1"])
    with pytest.raises(FewshotError, match="no classes"):
        synthetic.split_by_group(["g0", "g1", "g2"])
    nogroups = ClassDataset(synthetic.data, synthetic.counts, synthetic.names)
    with pytest.raises(FewshotError, match="no groups"):
        nogroups.split_by_group(["g0"])


@pytest.mark.parametrize("test_frac, n_test", [(0.1, 2), (0.2, 4), (0.5, 10)])
def test_split_fraction(test_frac: float, n_test: int) -> None:
    ds = make_synthetic(n_classes=20, per_class=3)
    train, test = ds.split_fraction(test=test_frac, seed=3)
    assert len(test) == n_test and len(train) == 20 - n_test
    assert not set(train.names) & set(test.names)
    assert sorted(train.names + test.names) == ds.names
    for part in (train, test):                          # images travel with their class
        for i, n in enumerate(part.names):
            assert torch.equal(part.images(i), ds.images(ds.names.index(n)))
    again = ds.split_fraction(test=test_frac, seed=3)
    assert again[0].names == train.names and again[1].names == test.names
    other = ds.split_fraction(test=test_frac, seed=4)
    assert other[1].names != test.names


def test_split_fraction_with_val() -> None:
    ds = make_synthetic(n_classes=20, per_class=3)
    train, val, test = ds.split_fraction(test=0.2, val=0.1, seed=0)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    names = [set(p.names) for p in (train, val, test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set().union(*names) == set(ds.names)


@pytest.mark.parametrize("test, val", [(0.0, 0.0), (1.0, 0.0), (0.6, 0.5), (-0.1, 0.0)])
def test_split_fraction_bad_fractions(synthetic: ClassDataset, test: float, val: float) -> None:
    with pytest.raises(FewshotError, match="bad split fractions"):
        synthetic.split_fraction(test=test, val=val)


def test_split_fraction_too_few_classes() -> None:
    ds = make_synthetic(n_classes=2, per_class=2, groups=0)
    with pytest.raises(FewshotError, match="2 classes are too few"):
        ds.split_fraction(test=0.5, val=0.4)


def test_split_by_names(synthetic: ClassDataset) -> None:
    a, b = synthetic.split_by_names(["c03", "c01"], ["c07"])
    assert a.names == ["c03", "c01"] and b.names == ["c07"]
    assert torch.equal(a.images(0), synthetic.images(3))
    with pytest.raises(FewshotError, match="class 'zz' from the class list is not in the data"):
        synthetic.split_by_names(["c01", "zz"])


def test_parse_split() -> None:
    assert parse_split("fraction:0.3") == {"kind": "fraction", "test": 0.3}
    assert parse_split("80-20") == {"kind": "fraction", "test": 0.2}
    assert parse_split("90-10") == {"kind": "fraction", "test": 0.1}
    assert parse_split("group:A,B+val:C") == {"kind": "group", "test": ["A", "B"], "val": ["C"]}
    assert parse_split("files:a.txt,b.txt")["val"] is None
    for bad in ("fraction:x", "group:", "files:a.txt", "nonsense"):
        with pytest.raises(FewshotError):
            parse_split(bad)


def test_split_dataset_from_files(synthetic: ClassDataset, tmp_path: Path) -> None:
    (tmp_path / "tr.txt").write_text("# train\nc00\nc01\nc02\nc03\n")
    (tmp_path / "te.txt").write_text("c10\nc11\n")
    cfg = RunConfig(split=f"files:{tmp_path / 'tr.txt'},{tmp_path / 'te.txt'}", val_fraction=0.0)
    train, val, test = split_dataset(synthetic, cfg)
    assert train.names == ["c00", "c01", "c02", "c03"] and test.names == ["c10", "c11"] and val is None
    (tmp_path / "te.txt").write_text("c03\nc11\n")
    with pytest.raises(FewshotError, match="'c03' is in both the train and test lists"):
        split_dataset(synthetic, cfg)
    cfg.split = f"files:{tmp_path / 'tr.txt'},{tmp_path / 'missing.txt'}"
    with pytest.raises(FewshotError, match="no such class-list file"):
        split_dataset(synthetic, cfg)


def test_split_dataset_adds_validation_classes(synthetic: ClassDataset) -> None:
    train, val, test = split_dataset(synthetic, RunConfig(split="group:g0", val_fraction=0.25))
    assert set(test.groups) == {"g0"} and len(val) == 2 and len(train) == 6
    assert not set(train.names) & set(val.names)


# ------------------------------------------------------------------------------------------ transforms
def test_with_rotations(synthetic: ClassDataset) -> None:
    rot = synthetic.with_rotations()
    assert len(rot) == 4 * len(synthetic) and rot.num_images == 4 * synthetic.num_images
    assert rot.names[:12] == synthetic.names
    assert rot.names[12] == "c00@rot90" and rot.names[24] == "c00@rot180" and rot.names[36] == "c00@rot270"
    assert rot.groups[12:24] == synthetic.groups
    for k, off in ((1, 12), (2, 24), (3, 36)):
        for c in (0, 7):
            assert torch.equal(rot.images(off + c), torch.rot90(synthetic.images(c), k, dims=(2, 3)))


def test_rotation_by_hand() -> None:
    x = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8)
    ds = ClassDataset(x, [1], ["a"]).with_rotations([90, 180, 270])
    # torch.rot90 turns counter-clockwise: the top row becomes the left column read bottom-up
    assert ds.images(1)[0, 0].tolist() == [[2, 4], [1, 3]]
    assert ds.images(2)[0, 0].tolist() == [[4, 3], [2, 1]]
    assert ds.images(3)[0, 0].tolist() == [[3, 1], [4, 2]]
    with pytest.raises(FewshotError, match="rotation angles"):
        ClassDataset(x, [1], ["a"]).with_rotations([45])


def test_relabel(synthetic: ClassDataset) -> None:
    labels = torch.arange(synthetic.num_images) % 3
    out = synthetic.relabel(labels)
    assert out.names == ["cluster0", "cluster1", "cluster2"] and out.counts.tolist() == [40, 40, 40]
    assert torch.equal(out.images(1), synthetic.data[1::3])
    assert out.groups is None
    named = synthetic.relabel(labels, names=["x", "y", "z"])
    assert named.names == ["x", "y", "z"]
    with pytest.raises(ValueError, match="one label per image"):
        synthetic.relabel(labels[:-1])


# ------------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip(synthetic: ClassDataset, tmp_path: Path) -> None:
    ds = ClassDataset(synthetic.data, synthetic.counts, synthetic.names, synthetic.groups,
                      Preprocess(size=(12, 12), channels=1, invert=True), source="synthetic test")
    ds.save(tmp_path / "sub" / "ds.pt")
    back = ClassDataset.load(tmp_path / "sub" / "ds.pt")
    assert torch.equal(back.data, ds.data) and torch.equal(back.counts, ds.counts)
    assert back.names == ds.names and back.groups == ds.groups
    assert back.preprocess == ds.preprocess and back.source == ds.source
    assert not list((tmp_path / "sub").glob("*.tmp*"))


def test_cached(tmp_path: Path, synthetic: ClassDataset) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"raw data")
    cache = tmp_path / "cache"
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.3)
        return synthetic

    t = time.perf_counter()
    first = cached([src], {"p": 1}, build, tag="t", cache=cache)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    second = cached([src], {"p": 1}, build, tag="t", cache=cache)
    t_second = time.perf_counter() - t
    assert len(calls) == 1 and t_first >= 0.3 and t_second < 0.2
    assert torch.equal(first.data, second.data) and first.names == second.names and first.groups == second.groups
    assert len(list(cache.glob("t-*.pt"))) == 1
    # other parameters, or a changed source, miss the cache
    cached([src], {"p": 2}, build, tag="t", cache=cache)
    assert len(calls) == 2
    src.write_bytes(b"raw data, changed")
    cached([src], {"p": 1}, build, tag="t", cache=cache)
    assert len(calls) == 3
    # a corrupt cache file is rebuilt, cache=False never reads or writes
    for f in cache.glob("t-*.pt"):
        f.write_bytes(b"garbage")
    cached([src], {"p": 1}, build, tag="t", cache=cache)
    assert len(calls) == 4
    cached([src], {"p": 1}, build, tag="t", cache=False)
    cached([src], {"p": 1}, build, tag="t", cache=False)
    assert len(calls) == 6


def test_cached_default_location(tmp_path: Path, synthetic: ClassDataset) -> None:
    src_dir = tmp_path / "data"
    src_dir.mkdir()
    cached([src_dir], {}, lambda: synthetic, tag="d")
    assert len(list((src_dir / ".fewshot-cache").glob("d-*.pt"))) == 1
