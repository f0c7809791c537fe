"""tiered-ImageNet and CUB-200-2011 loaders on fixtures written in the published layouts."""
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import fewshot.data as fsdata
from fewshot.data.dataset import mmap_mode
from fewshot.data.cub import cub, split_groups, split_lists
from fewshot.data.tiered import tiered_imagenet
from fewshot.errors import FewshotError

# ------------------------------------------------------------------------------------------ tiered-ImageNet
# split -> class ids (ImageNet wnids) and images per class
TIERED = {"train": (["n01530575", "n01531178", "n01532829", "n01534433"], [5, 3, 4, 6]),
          "val": (["n02085620", "n02085782"], [3, 4]),
          "test": (["n03000134", "n03000247", "n03000684"], [4, 3, 5])}


def _write_tiered(root, bytes_keys=("val",), size=12):
    """The release's files; images shuffled across classes (as files need not be sorted), every image
    marked with (split, class index, index within its class in file order) in its first pixels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s_i, (split, (names, counts)) in enumerate(TIERED.items()):
        labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
        labels = labels[rng.permutation(len(labels))]
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        seen = {}
        for i, c in enumerate(labels):
            images[i, 0, 0] = (s_i, c, seen.get(c, 0))
            seen[c] = seen.get(c, 0) + 1
        np.savez(root / f"{split}_images.npz", images=images)
        d = {"label_specific": labels, "label_general": np.zeros_like(labels),
             "label_specific_str": names, "label_general_str": ["mammal"]}
        if split in bytes_keys:      # as a Python 2 pickle read with encoding="bytes" stores them
            d = {k.encode(): ([n.encode() for n in v] if k.endswith("_str") else v) for k, v in d.items()}
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(d, f, protocol=2)
    return root


def _check_tiered(ds, size=12):
    names = [n for split in TIERED.values() for n in split[0]]
    counts = [c for split in TIERED.values() for c in split[1]]
    assert ds.names == names and ds.counts.tolist() == counts and len(ds) == 9
    assert ds.groups == ["train"] * 4 + ["val"] * 2 + ["test"] * 3
    assert ds.image_shape == (3, size, size)
    k = 0
    for s_i, (names_s, counts_s) in enumerate(TIERED.values()):
        for c, n in enumerate(counts_s):
            x = ds.images(k)
            assert x[:, :, 0, 0].tolist() == [[s_i, c, j] for j in range(n)]   # class order, file order
            k += 1


def test_tiered_npz_and_pickles(tmp_path):
    root = _write_tiered(tmp_path / "tiered")
    ds = tiered_imagenet(root, size=12, cache=tmp_path / "c", mmap=False)
    assert not ds.memory_mapped
    _check_tiered(ds)
    mm = tiered_imagenet(root, size=12, cache=tmp_path / "c", mmap=True)
    assert mm.memory_mapped and torch.equal(mm.data, ds.data)
    _check_tiered(mm)
    train, val, test = fsdata.published_split(mm)
    assert (len(train), len(val), len(test)) == (4, 2, 3) and test.memory_mapped
    assert torch.equal(test.data, fsdata.published_split(ds)[2].data)


def test_tiered_through_load_and_env(tmp_path, monkeypatch):
    root = _write_tiered(tmp_path / "data" / "tiered-imagenet")
    assert fsdata.kind_of(str(root)) == "tiered-imagenet"
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    ds = fsdata.load("tiered-imagenet", size=12)
    _check_tiered(ds)
    assert not ds.memory_mapped                                # small: auto keeps it in memory
    monkeypatch.setenv("FEWSHOT_MMAP_BYTES", "1000")           # auto maps it: decoded straight into the file
    mm = fsdata.load("tiered-imagenet", size=12)
    assert mm.memory_mapped and torch.equal(mm.data, ds.data)
    assert fsdata.load(str(root), size=12, mmap=False).memory_mapped is False
    grey = fsdata.load(str(root), size=8, channels=1, mmap=True)
    assert grey.memory_mapped and grey.image_shape == (1, 8, 8)


def test_tiered_bad_input(tmp_path):
    root = _write_tiered(tmp_path / "t")
    (root / "val_labels.pkl").unlink()
    with pytest.raises(FewshotError, match="val_images.npz is there but val_labels.pkl is missing"):
        tiered_imagenet(root, cache=False)
    root = _write_tiered(tmp_path / "t2")
    with open(root / "test_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.zeros(3, dtype=np.int64), "label_specific_str": ["n03000134"]}, f)
    with pytest.raises(FewshotError, match="holds 12 images but test_labels.pkl labels 3"):
        tiered_imagenet(root, cache=False)
    root = _write_tiered(tmp_path / "t3")
    with open(root / "test_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.zeros(12, dtype=np.int64), "label_specific_str": ["n02085620"]}, f)
    with pytest.raises(FewshotError, match="class n02085620 is in two splits"):
        tiered_imagenet(root, cache=False)
    root = _write_tiered(tmp_path / "t4")
    np.savez(root / "train_images.npz", pictures=np.zeros((18, 4, 4, 3), np.uint8))
    with pytest.raises(FewshotError, match="has no 'images' array"):
        tiered_imagenet(root, cache=False)
    data = (root / "val_images.npz").read_bytes()
    (root / "val_images.npz").write_bytes(data[:len(data) // 2])
    np.savez(root / "train_images.npz", images=np.zeros((18, 4, 4, 3), np.uint8))
    with pytest.raises(FewshotError, match="val_images.npz"):
        tiered_imagenet(root, cache=False)
    with pytest.raises(FewshotError, match="no tiered-ImageNet"):
        tiered_imagenet(tmp_path, cache=False)


# ------------------------------------------------------------------------------------------ CUB-200-2011
CUB_NAMES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani",
             "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet", "008.Rhinoceros_Auklet"]


def _write_cub(parent, per=(3, 2, 4, 2, 3, 2, 2, 3)):
    """The official layout; image ids interleave classes; each image a solid colour (its class, its index)
    inside its box on a white background; some grey photographs."""
    root = parent / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    images, labels, boxes = [], [], []
    order = [(c, j) for j in range(max(per)) for c in range(len(per)) if j < per[c]]     # interleaved ids
    for i, (c, j) in enumerate(order, 1):
        folder = root / "images" / CUB_NAMES[c]
        folder.mkdir(exist_ok=True)
        name = f"{CUB_NAMES[c].split('.', 1)[1]}_{j:04d}_{i}.jpg"
        im = Image.new("RGB", (60, 40), (255, 255, 255))
        im.paste((20 * c, 40 * j, 100), (10, 5, 40, 35))
        if (c + j) % 5 == 0:
            im = im.convert("L")
        im.save(folder / name, quality=95)
        images.append(f"{i} {CUB_NAMES[c]}/{name}")
        labels.append(f"{i} {c + 1}")
        boxes.append(f"{i} 10.0 5.0 30.0 30.0")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{k + 1} {n}" for k, n in enumerate(CUB_NAMES)) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def test_cub_folder_split_and_archive(tmp_path):
    root = _write_cub(tmp_path / "data")
    ds = cub(root, size=16, cache=tmp_path / "c")
    assert ds.names == CUB_NAMES and ds.counts.tolist() == [3, 2, 4, 2, 3, 2, 2, 3]
    # Chen et al.: index i (id - 1) even -> train, i % 4 == 1 -> val, i % 4 == 3 -> test
    assert ds.groups == ["train", "val", "train", "test", "train", "val", "train", "test"]
    assert ds.image_shape == (3, 16, 16) and ds.data.dtype == torch.uint8
    train, val, test = fsdata.published_split(ds)
    assert test.names == ["004.Groove_billed_Ani", "008.Rhinoceros_Auklet"] and len(val) == 2
    assert fsdata.kind_of(str(tmp_path / "data")) == "cub" and fsdata.kind_of(str(root)) == "cub"
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="CUB_200_2011")
    assert fsdata.kind_of(str(archive)) == "cub"
    from_tgz = fsdata.load(str(archive), size=16, cache=tmp_path / "c2")
    assert from_tgz.names == ds.names and torch.equal(from_tgz.data, ds.data)
    cropped = cub(root, size=16, crop=True, cache=False)
    # cropped to the box: the solid colour fills the image (no white border left)
    x = cropped.images(2)[1].float()                          # class 2, image 1: colour (40, 40, 100)
    assert abs(x[0].mean().item() - 40) < 6 and abs(x[1].mean().item() - 40) < 6 and x.max() < 140
    assert ds.images(2)[1].float().max() > 240                 # uncropped: the white background is there


def test_cub_through_env_and_mmap(tmp_path, monkeypatch):
    _write_cub(tmp_path / "data")
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    ds = fsdata.load("cub", size=16)
    assert len(ds) == 8 and not ds.memory_mapped
    mm = fsdata.load("cub", size=16, mmap=True)
    assert mm.memory_mapped and torch.equal(mm.data, ds.data) and mm.groups == ds.groups


def test_cub_bad_input(tmp_path):
    root = _write_cub(tmp_path / "a")
    next((root / "images" / CUB_NAMES[3]).iterdir()).unlink()
    with pytest.raises(FewshotError, match="images.txt lists 004.Groove_billed_Ani/.*which is not in"):
        cub(root, cache=False)
    root = _write_cub(tmp_path / "b")
    (root / "image_class_labels.txt").write_text("1 1\n2 two\n")
    with pytest.raises(FewshotError, match="not a number"):
        cub(root, cache=False)
    root = _write_cub(tmp_path / "c")
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(FewshotError, match="crop=True needs .*bounding_boxes.txt"):
        cub(root, crop=True, cache=False)
    with pytest.raises(FewshotError, match="no CUB-200-2011"):
        cub(tmp_path / "c" / "CUB_200_2011" / "images", cache=False)


def test_shipped_cub_split_is_chen_et_al():
    train, val, test = split_lists()
    assert (len(train), len(val), len(test)) == (100, 50, 50)
    every = sorted(train + val + test)
    assert len(set(every)) == 200 and [int(n[:3]) for n in every] == list(range(1, 201))
    assert all((int(n[:3]) - 1) % 2 == 0 for n in train)
    assert all((int(n[:3]) - 1) % 4 == 1 for n in val) and all((int(n[:3]) - 1) % 4 == 3 for n in test)
    assert train[0] == "001.Black_footed_Albatross" and test[-1] == "200.Common_Yellowthroat"
    assert split_groups(["002.Laysan_Albatross", "999.Dodo"]) == ["val", "other"]


def test_train_and_eval_on_memory_mapped_tiered(tmp_path, monkeypatch, capsys):
    from fewshot.cli import main
    from fewshot.config import RunConfig
    from fewshot.run import split_dataset
    root = _write_tiered(tmp_path / "tiered")
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    ds = fsdata.load(str(root), size=12, mmap=True)
    tr, va, te = split_dataset(ds, RunConfig(split="auto"))
    assert (tr.names, va.names, te.names) == tuple(TIERED[s][0] for s in ("train", "val", "test"))
    assert tr.memory_mapped and te.memory_mapped
    out = tmp_path / "run"
    rc = main(["train", "protonet", "--data", str(root), "--size", "16", "--mmap", "true", "--ways", "3",
               "--shots", "1", "--queries", "2", "--episodes", "3", "--val-every", "0", "--test-episodes", "5",
               "--test-ways", "3", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert mmap_mode(RunConfig.load(out / "config.yaml").mmap) is True       # recorded; eval maps it too
    assert main(["eval", str(out), "--episodes", "4", "--ways", "3", "--no-progress"]) == 0
    assert main(["train", "protonet", "--data", str(root), "--mmap", "sometimes", "--out", str(tmp_path / "r2"),
                 "--no-progress"]) == 2
    assert "--mmap must be auto, true or false" in capsys.readouterr().err
