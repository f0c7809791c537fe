"""CIFAR-100 from the official python pickles (folder and .tar.gz), pooled train+test, superclass groups,
the shipped CIFAR-FS and FC100 splits, caching, the download helper offline, and a run through the CLI."""
from __future__ import annotations

import io
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import fewshot.data as fsdata
from fewshot.config import parse_split
from fewshot.data import cifar
from fewshot.errors import FewshotError

from test_cli import run_cli

#: CIFAR-100's 20 superclasses and their fine classes (Krizhevsky 2009).
SUPER = {
    'aquatic_mammals': ['beaver', 'dolphin', 'otter', 'seal', 'whale'],
    'fish': ['aquarium_fish', 'flatfish', 'ray', 'shark', 'trout'],
    'flowers': ['orchid', 'poppy', 'rose', 'sunflower', 'tulip'],
    'food_containers': ['bottle', 'bowl', 'can', 'cup', 'plate'],
    'fruit_and_vegetables': ['apple', 'mushroom', 'orange', 'pear', 'sweet_pepper'],
    'household_electrical_devices': ['clock', 'keyboard', 'lamp', 'telephone', 'television'],
    'household_furniture': ['bed', 'chair', 'couch', 'table', 'wardrobe'],
    'insects': ['bee', 'beetle', 'butterfly', 'caterpillar', 'cockroach'],
    'large_carnivores': ['bear', 'leopard', 'lion', 'tiger', 'wolf'],
    'large_man-made_outdoor_things': ['bridge', 'castle', 'house', 'road', 'skyscraper'],
    'large_natural_outdoor_scenes': ['cloud', 'forest', 'mountain', 'plain', 'sea'],
    'large_omnivores_and_herbivores': ['camel', 'cattle', 'chimpanzee', 'elephant', 'kangaroo'],
    'medium_mammals': ['fox', 'porcupine', 'possum', 'raccoon', 'skunk'],
    'non-insect_invertebrates': ['crab', 'lobster', 'snail', 'spider', 'worm'],
    'people': ['baby', 'boy', 'girl', 'man', 'woman'],
    'reptiles': ['crocodile', 'dinosaur', 'lizard', 'snake', 'turtle'],
    'small_mammals': ['hamster', 'mouse', 'rabbit', 'shrew', 'squirrel'],
    'trees': ['maple_tree', 'oak_tree', 'palm_tree', 'pine_tree', 'willow_tree'],
    'vehicles_1': ['bicycle', 'bus', 'motorcycle', 'pickup_truck', 'train'],
    'vehicles_2': ['lawn_mower', 'rocket', 'streetcar', 'tank', 'tractor'],
}
FINE = sorted(c for cs in SUPER.values() for c in cs)      # the official label order is alphabetical
COARSE = sorted(SUPER)
COARSE_OF = {c: s for s, cs in SUPER.items() for c in cs}
N_TRAIN, N_TEST = 3, 2                                      # images per class in each official part


def _part(split: int, per_class: int, seed: int) -> dict:
    """An official-format part: rows [n, 3072] (R plane, G plane, B plane), classes shuffled together.
    Each image encodes itself: R = fine label, G = 100 + split (0 train, 1 test), B = index within class."""
    rows, fine, coarse = [], [], []
    for c, name in enumerate(FINE):
        for i in range(per_class):
            img = np.zeros((3, 32, 32), np.uint8)
            img[0], img[1], img[2] = c, 100 + split, i
            img[0, 5:9, 7:20] = 255 - c           # a class-specific mark (learnable)
            img[1, (3 * c + i) % 32, 1:] = 250   # pixel (0, 0) of each plane stays the code
            rows.append(img.reshape(-1))
            fine.append(c)
            coarse.append(COARSE.index(COARSE_OF[name]))
    order = np.random.RandomState(seed).permutation(len(rows))
    return {"filenames": [f"img{k}.png" for k in order], "batch_label": "fixture",
            "fine_labels": [fine[k] for k in order], "coarse_labels": [coarse[k] for k in order],
            "data": np.stack(rows)[order]}


def write_cifar(root: Path) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` as published (protocol-2 pickles). Returns the folder."""
    d = root / cifar.FOLDER
    d.mkdir(parents=True)
    parts = {"train": _part(0, N_TRAIN, 1), "test": _part(1, N_TEST, 2),
             "meta": {"fine_label_names": FINE, "coarse_label_names": COARSE}}
    for name, obj in parts.items():
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    return d


def write_tar(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=cifar.FOLDER)
    return dest


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def cifar_ds(cifar_dir):
    return cifar.cifar100(cifar_dir, cache=False)


def test_folder_loads_every_class_pooled_with_superclass_groups(cifar_ds) -> None:
    ds = cifar_ds
    assert len(ds) == 100 and ds.names == FINE
    assert ds.data.dtype == torch.uint8 and ds.image_shape == (3, 32, 32)
    assert ds.counts.tolist() == [N_TRAIN + N_TEST] * 100
    assert ds.groups == [COARSE_OF[n] for n in FINE] and len(ds.group_names()) == 20
    assert ds.preprocess.channels == 3 and ds.preprocess.size == (32, 32) and ds.preprocess.audio is None
    for c in (0, 37, 99):
        imgs = ds.images(c)
        assert (imgs[:, 0, 0, 0] == c).all()                  # planes decoded as R, G, B of the right class
        # every image of both official parts, the train images first, then the test images
        assert imgs[:, 1, 0, 0].tolist() == [100] * N_TRAIN + [101] * N_TEST
        idx = imgs[:, 2, 0, 0].tolist()
        assert sorted(idx[:N_TRAIN]) == list(range(N_TRAIN)) and sorted(idx[N_TRAIN:]) == list(range(N_TEST))


def test_tar_gz_read_in_memory_equals_folder(cifar_dir, cifar_ds, tmp_path) -> None:
    tar = write_tar(cifar_dir, tmp_path / cifar.ARCHIVE)
    ds = cifar.cifar100(tar, cache=False)
    assert ds.names == cifar_ds.names and ds.groups == cifar_ds.groups
    assert torch.equal(ds.data, cifar_ds.data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cifar.ARCHIVE]     # nothing extracted
    # a folder holding the archive, and the kind detection used by --data
    assert torch.equal(cifar.cifar100(tmp_path, cache=False).data, cifar_ds.data)
    assert fsdata.kind_of(str(tar)) == "cifar100" and fsdata.kind_of(str(tmp_path)) == "cifar100"
    assert fsdata.kind_of(str(cifar_dir)) == "cifar100" and fsdata.kind_of(str(cifar_dir.parent)) == "cifar100"


def test_resize_and_named_data_through_env(cifar_dir, monkeypatch) -> None:
    monkeypatch.setenv("FEWSHOT_DATA", str(cifar_dir.parent))
    ds = fsdata.load("cifar100", size=16, cache=False)
    assert ds.image_shape == (3, 16, 16) and ds.preprocess.size == (16, 16) and len(ds) == 100
    assert (ds.images(5)[:, 0, 0, 0] == 5).all()              # a flat region keeps its value
    like = fsdata.load_like("cifar100", ds.preprocess, cache=False)
    assert torch.equal(like.data, ds.data)


def test_cache_is_written_next_to_the_data_and_reused(cifar_dir, tmp_path, monkeypatch) -> None:
    root = write_cifar(tmp_path)
    first = cifar.cifar100(root)
    cached = list((root / ".fewshot-cache").glob("cifar100-*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(cifar, "_build", lambda *a: pytest.fail("the cache was not used"))
    again = cifar.cifar100(root)
    assert torch.equal(again.data, first.data) and again.groups == first.groups
    monkeypatch.undo()
    other = cifar.cifar100(root, size=8)  # other settings -> another cache entry, not the stale one
    assert other.image_shape == (3, 8, 8)
    assert len(list((root / ".fewshot-cache").glob("cifar100-*.pt"))) == 2


def test_shipped_split_lists_have_the_published_sizes() -> None:
    tr, va, te = cifar.split_lists("cifar-fs")
    assert (len(tr), len(va), len(te)) == (64, 16, 20)
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    assert sorted(tr + va + te) == FINE
    gtr, gva, gte = cifar.split_lists("fc100")
    assert (len(gtr), len(gva), len(gte)) == (12, 4, 4)
    assert sorted(gtr + gva + gte) == COARSE
    assert set(gte) == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    with pytest.raises(FewshotError, match="unknown named split"):
        cifar.split_lists("mini")


def test_cifar_fs_and_fc100_splits_on_the_data(cifar_ds) -> None:
    tr, va, te = cifar.named_split(cifar_ds, "cifar-fs")
    assert (len(tr), len(va), len(te)) == (64, 16, 20)
    assert te.names == cifar.split_lists("cifar-fs")[2]
    assert te.num_images == 20 * (N_TRAIN + N_TEST)
    for part in (tr, va, te):                                 # images follow their class
        for c, n in enumerate(part.names):
            assert (part.images(c)[:, 0, 0, 0] == FINE.index(n)).all()
    tr, va, te = cifar.named_split(cifar_ds, "fc100")
    assert (len(tr), len(va), len(te)) == (60, 20, 20)
    groups = [set(p.groups) for p in (tr, va, te)]
    assert [len(g) for g in groups] == [12, 4, 4]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert all(COARSE_OF[n] == g for p in (tr, va, te) for n, g in zip(p.names, p.groups))


def test_named_splits_through_the_run_config(cifar_ds, synthetic) -> None:
    from fewshot.config import RunConfig
    from fewshot.run import split_dataset
    assert parse_split("cifar-fs") == {"kind": "named", "name": "cifar-fs"}
    assert parse_split("fc100") == {"kind": "named", "name": "fc100"}
    with pytest.raises(FewshotError, match="cifar-fs or fc100"):
        parse_split("fc100:x")
    tr, va, te = split_dataset(cifar_ds, RunConfig(split="fc100"))
    assert (len(tr), len(va), len(te)) == (60, 20, 20)
    with pytest.raises(FewshotError, match="needs CIFAR-100's fine classes"):
        split_dataset(synthetic, RunConfig(split="cifar-fs"))
    with pytest.raises(FewshotError, match="needs CIFAR-100's superclasses"):
        split_dataset(synthetic, RunConfig(split="fc100"))


def test_bad_inputs_give_clear_errors(tmp_path, cifar_dir) -> None:
    with pytest.raises(FewshotError, match="no CIFAR-100 data"):
        cifar.cifar100(tmp_path, cache=False)
    bad = tmp_path / "bad" / cifar.FOLDER
    bad.mkdir(parents=True)
    for p in ("train", "test", "meta"):
        (bad / p).write_bytes((cifar_dir / p).read_bytes())
    (bad / "test").write_bytes(b"not a pickle")
    with pytest.raises(FewshotError, match="cannot read .*test"):
        cifar.cifar100(bad.parent, cache=False)
    # a pickle that would run code is refused, not executed
    evil = pickle.dumps({"data": __import__("os").system}, protocol=2)
    (bad / "test").write_bytes(evil)
    with pytest.raises(FewshotError, match="refusing to load"):
        cifar.cifar100(bad.parent, cache=False)


def test_download_fails_fast_offline_and_checks_the_md5(tmp_path, monkeypatch) -> None:
    assert cifar.URL == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert cifar.MD5 == "eb9058c3a382ffc7106e4002c42a8d85"

    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FewshotError, match=f"put {cifar.ARCHIVE} into {tmp_path}"):
        cifar.cifar100(tmp_path, download=True, cache=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"corrupt"))
    with pytest.raises(FewshotError, match="checksum mismatch"):
        cifar.download_archive(tmp_path)
    assert not any(tmp_path.iterdir())                        # no partial file left behind


def test_train_eval_on_fc100_through_the_cli(capsys, tmp_path, cifar_dir) -> None:
    """A protonet on the fixture's FC100 split: trains, evaluates on the 20 test-superclass classes, and its
    test classes are exactly those of FC100's test superclasses."""
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "protonet", "--data", cifar_dir.parent, "--size", "16",
                           "--split", "fc100", "--ways", "5", "--shots", "1", "--queries", "2", "--episodes", "30",
                           "--val-every", "0", "--hidden", "16", "--test-ways", "5", "--test-queries", "3",
                           "--test-episodes", "40", "--no-progress", "--out", run)
    assert rc == 0, err
    acc = float(out.split("test accuracy:")[1].split("±")[0]) / 100
    assert acc > 0.5, out                                     # chance is 0.2
    test_names = [n for n in (run / "classes_test.txt").read_text().split() if n]
    fc_test = cifar.split_lists("fc100")[2]
    assert sorted(test_names) == sorted(c for s in fc_test for c in SUPER[s])
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "5", "--shots", "1", "--queries", "2",
                           "--episodes", "10", "--no-progress")
    assert rc == 0 and "5-way 1-shot" in out, err
