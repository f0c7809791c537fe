"""mini-ImageNet in both layouts users have (Ravi & Larochelle's images/ + CSVs, and the cache pickles), the
published split through the run config, the safe unpickler, and flat folders labelled by a sheet or a
file-name pattern. Every fixture is written here in exactly the real format."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fewshot.data as fsdata
from conftest import need_shared
from fewshot.cli import main
from fewshot.config import RunConfig, parse_split
from fewshot.data import labeled, miniimagenet as mi
from fewshot.data.safepickle import load_pickle
from fewshot.errors import FewshotError
from fewshot.run import split_dataset

#: a miniature mini-ImageNet: class ids in the real n0xxxxxxx form, (train, val, test) like 64/16/20
SPLIT = {"train": ["n01532829", "n01558993", "n01704323", "n01749939", "n01770081"],
         "val": ["n01855672", "n02091244", "n02114548"],
         "test": ["n01930112", "n01981276", "n02099601"]}
PER_CLASS = 6


def class_image(cls: str, i: int, size: int = 84) -> np.ndarray:
    """An RGB uint8 image [size, size, 3]: a colour and stripe period fixed by the class, noise by ``i``."""
    rng = np.random.default_rng(zlib.crc32(f"{cls}/{i}".encode()))
    k = sum(map(ord, cls))
    base = np.array([k * 37 % 256, k * 91 % 256, k * 53 % 256], dtype=np.float64)
    stripes = ((np.arange(size) // (2 + k % 5)) % 2)[None, :, None] * 60.0
    im = base + stripes + rng.normal(0, 12, (size, size, 3))
    return np.clip(im, 0, 255).astype(np.uint8)


def write_ravi(root: Path, split=SPLIT, per_class: int = PER_CLASS) -> Path:
    """``root/images/<id><8-digit index>.jpg`` and ``root/{train,val,test}.csv`` (header, filename,label)."""
    (root / "images").mkdir(parents=True)
    for part, classes in split.items():
        with open(root / f"{part}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            for c in classes:
                for i in range(per_class):
                    name = f"{c}{i + 1:08d}.jpg"
                    Image.fromarray(class_image(c, i)).save(root / "images" / name, quality=95)
                    w.writerow([name, c])
    return root


def write_pickles(root: Path, split=SPLIT, per_class: int = PER_CLASS, protocol: int = 4,
                  index_type=list) -> dict:
    """``root/mini-imagenet-cache-{train,val,test}.pkl`` as the shared files are: a dict with "image_data"
    (uint8 [N, 84, 84, 3]) and "class_dict" ({class id: indices}); returns {class id: its images}."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for part, classes in split.items():
        order = list(reversed(classes))   # the images of a class need not come in class order
        x = np.stack([class_image(c, i) for c in order for i in range(per_class)])
        class_dict = {c: index_type(range(j * per_class, (j + 1) * per_class)) for j, c in enumerate(order)}
        with open(root / f"mini-imagenet-cache-{part}.pkl", "wb") as fh:
            pickle.dump({"image_data": x, "class_dict": class_dict}, fh, protocol=protocol)
        truth.update({c: x[class_dict[c]] for c in classes})
    return truth


@pytest.fixture(scope="module")
def ravi_root(tmp_path_factory) -> Path:
    return write_ravi(tmp_path_factory.mktemp("mini") / "mini-imagenet")


# ------------------------------------------------------------------------------------------ the CSV layout
def test_ravi_layout_loads_classes_in_split_order_with_the_split_as_group(ravi_root: Path) -> None:
    assert fsdata.kind_of(str(ravi_root)) == "mini-imagenet"
    ds = fsdata.load(str(ravi_root), size=84, cache=False)
    assert ds.names == SPLIT["train"] + SPLIT["val"] + SPLIT["test"]
    assert ds.groups == ["train"] * 5 + ["val"] * 3 + ["test"] * 3
    assert ds.image_shape == (3, 84, 84) and ds.counts.tolist() == [PER_CLASS] * 11
    # RGB pixels exactly as Pillow decodes the JPEG, images of a class in the CSV's order
    c = SPLIT["val"][1]
    want = np.asarray(Image.open(ravi_root / "images" / f"{c}00000003.jpg").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(ds.images(ds.names.index(c))[2].numpy(), want)
    dist = [abs(want.astype(float) - class_image(c, i).transpose(2, 0, 1)).mean() for i in range(PER_CLASS)]
    assert int(np.argmin(dist)) == 2                  # the third row's image, not another of the class
    small = fsdata.load(str(ravi_root), size=32, cache=False)
    assert small.image_shape == (3, 32, 32)


def test_the_published_split_is_the_default_and_split_overrides_it(ravi_root: Path) -> None:
    ds = fsdata.load(str(ravi_root), size=16, cache=False)
    for spec in ("auto", "published"):
        tr, va, te = split_dataset(ds, RunConfig(split=spec))
        assert (tr.names, va.names, te.names) == (SPLIT["train"], SPLIT["val"], SPLIT["test"])
    assert RunConfig().split == "auto" and parse_split("published") == {"kind": "published"}
    # an explicit split ignores the published one
    tr, va, te = split_dataset(ds, RunConfig(split="fraction:0.5", val_fraction=0))
    assert va is None and len(te) == 6 and set(te.names) != set(SPLIT["test"])
    tr, va, te = split_dataset(ds, RunConfig(split="group:val", val_fraction=0))
    assert te.names == SPLIT["val"] and va is None
    # data without a published split: auto is the seeded 80-20 it always was; published is an error
    other = fsdata.load(str(ravi_root / "images"), size=16, cache=False, label_pattern=r"^(n\d{8})")
    assert not fsdata.has_published_split(other)
    auto = split_dataset(other, RunConfig(split="auto"))
    frac = split_dataset(other, RunConfig(split="fraction:0.2"))
    assert [p.names for p in auto] == [p.names for p in frac]
    with pytest.raises(FewshotError, match="--split published needs data that comes with"):
        split_dataset(other, RunConfig(split="published"))


def test_a_csv_naming_a_missing_image_names_the_file(tmp_path: Path) -> None:
    root = write_ravi(tmp_path / "mini", per_class=2)
    (root / "images" / f"{SPLIT['test'][1]}00000002.jpg").unlink()
    with pytest.raises(FewshotError) as e:
        fsdata.load(str(root), size=16, cache=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{SPLIT['test'][1]}00000002.jpg" in msg and "test.csv, row 5" in msg


def test_csv_layout_errors_are_one_line(tmp_path: Path) -> None:
    root = write_ravi(tmp_path / "mini", per_class=2)
    with open(root / "test.csv", "a") as fh:          # a training class listed again in test.csv
        fh.write(f"{SPLIT['train'][0]}00000001.jpg,{SPLIT['train'][0]}\n")
    with pytest.raises(FewshotError, match=f"class {SPLIT['train'][0]} is in both the train and the test split"):
        fsdata.load(str(root), size=16, cache=False)
    (root / "test.csv").write_text("filename,label\nn0193011200000001.jpg\n")
    with pytest.raises(FewshotError, match=r"test.csv, row 2: expected path,label"):
        fsdata.load(str(root), size=16, cache=False)
    with pytest.raises(FewshotError, match="no mini-ImageNet in"):
        mi.mini_imagenet(tmp_path, cache=False)


def test_class_in_two_splits_is_refused(tmp_path: Path) -> None:
    split = {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04", "n02"]}
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    for part, classes in split.items():
        rows = ["filename,label"]
        for c in classes:
            name = f"{c}_{part}.jpg"
            Image.fromarray(class_image(c, 0, 8)).save(root / "images" / name)
            rows.append(f"{name},{c}")
        (root / f"{part}.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FewshotError, match="class n02 is in both the train and the test split"):
        fsdata.load(str(root), size=8, cache=False)


def test_the_second_load_comes_from_the_decode_cache(tmp_path: Path, monkeypatch) -> None:
    root = write_ravi(tmp_path / "mini", per_class=2)
    first = fsdata.load(str(root), size=20)
    assert list((root / ".fewshot-cache").glob("mini-imagenet-*.pt"))

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(labeled, "load_image", no_decoding)
    second = fsdata.load(str(root), size=20)
    assert second.names == first.names and second.groups == first.groups
    assert (second.data == first.data).all()
    # removing an image changes the images/ folder, so the cache is not used and the CSV names the file
    (root / "images" / f"{SPLIT['val'][0]}00000001.jpg").unlink()
    with pytest.raises(FewshotError, match=f"val.csv, row 2: image {SPLIT['val'][0]}00000001.jpg not found"):
        fsdata.load(str(root), size=20)


def test_mini_imagenet_by_name_through_fewshot_data(tmp_path: Path, monkeypatch) -> None:
    write_ravi(tmp_path / "data" / "mini-imagenet", per_class=2)
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    assert fsdata.kind_of("mini-imagenet") == "mini-imagenet"
    ds = fsdata.load("mini-imagenet", size=12, cache=False)
    assert len(ds) == 11 and ds.source == "mini-imagenet:mini-imagenet"
    monkeypatch.delenv("FEWSHOT_DATA")
    with pytest.raises(FewshotError, match="no mini-ImageNet path given: pass --data PATH or set FEWSHOT_DATA"):
        fsdata.load("mini-imagenet", cache=False)


def test_the_shipped_ravi_csvs_read_as_64_16_20_classes_of_600() -> None:
    """The real split files (no images needed): the reader sees the published split."""
    folder = need_shared("mini-imagenet")
    want = {"train": 64, "val": 16, "test": 20}
    seen = set()
    for part, n in want.items():
        rows = labeled.read_sheet(folder / f"{part}.csv")
        by = {}
        for _, name, label in rows:
            by.setdefault(label, []).append(name)
            assert name.startswith(label) and name.endswith(".jpg")
        assert len(by) == n and {len(v) for v in by.values()} == {600}
        assert not seen & set(by)
        seen |= set(by)


# ------------------------------------------------------------------------------------------ the pickles
@pytest.mark.parametrize("protocol,index_type", [(2, list), (4, np.array), (5, list)])
def test_pickle_layout_matches_the_arrays(tmp_path: Path, protocol, index_type) -> None:
    truth = write_pickles(tmp_path / "pk", protocol=protocol, index_type=index_type)
    assert fsdata.kind_of(str(tmp_path / "pk")) == "mini-imagenet"
    ds = fsdata.load(str(tmp_path / "pk"), size=84, cache=False)
    assert ds.names == SPLIT["train"] + SPLIT["val"] + SPLIT["test"]
    assert ds.groups == ["train"] * 5 + ["val"] * 3 + ["test"] * 3
    for i, c in enumerate(ds.names):
        assert np.array_equal(ds.images(i).numpy(), truth[c].transpose(0, 3, 1, 2))
    small = fsdata.load(str(tmp_path / "pk"), size=[24, 32], cache=False)
    assert small.image_shape == (3, 24, 32)
    want = np.asarray(Image.fromarray(truth[SPLIT["test"][0]][1]).resize((32, 24), Image.BILINEAR))
    assert np.array_equal(small.images(small.names.index(SPLIT["test"][0]))[1].numpy(), want.transpose(2, 0, 1))
    tr, va, te = split_dataset(ds, RunConfig())
    assert (tr.names, va.names, te.names) == (SPLIT["train"], SPLIT["val"], SPLIT["test"])
    # one pickle on its own: that split's classes
    one = fsdata.load(str(tmp_path / "pk" / "mini-imagenet-cache-val.pkl"), size=84, cache=False)
    assert one.names == SPLIT["val"] and one.groups == ["val"] * 3


def test_both_layouts_give_the_same_classes_in_the_same_order(tmp_path: Path, ravi_root: Path) -> None:
    write_pickles(tmp_path / "pk", per_class=3)
    a = fsdata.load(str(tmp_path / "pk"), size=8, cache=False)
    b = fsdata.load(str(ravi_root), size=8, cache=False)
    assert a.names == b.names and a.groups == b.groups


class _RunsCode:
    """Unpickling this would run ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_with_one_line(tmp_path: Path, capsys) -> None:
    root = tmp_path / "pk"
    write_pickles(root, per_class=2)
    marker = tmp_path / "ran"
    evil = {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n01": [0, 1]},
            "extra": _RunsCode(marker)}
    (root / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(evil, protocol=4))
    with pytest.raises(FewshotError, match=r"refusing to load (posix|nt|os)\.system from .*cache-val\.pkl"):
        fsdata.load(str(root), cache=False)
    assert not marker.exists()
    rc = main(["train", "protonet", "--data", str(root), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("fewshot: error: refusing to load")
    assert not marker.exists() and not (tmp_path / "run").exists()
    for bad in (pickle.dumps(eval), pickle.dumps(io.BytesIO)):
        with pytest.raises(FewshotError, match="refusing to load (builtins.eval|_io.BytesIO)"):
            load_pickle(bad, "x.pkl")


def test_safe_unpickler_rebuilds_what_numpy_writes() -> None:
    value = {"a": np.arange(12, dtype=np.int16).reshape(3, 4), b"b": [np.float32(1.5), np.int64(7)],
             "c": ("x", 1, 2.0, None, True), "d": np.zeros((0, 2), np.uint8), "e": np.asfortranarray(np.eye(3))}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        got = load_pickle(pickle.dumps(value, protocol=protocol), "v")
        assert np.array_equal(got["a"], value["a"]) and got["a"].dtype == np.int16
        assert got[b"b"] == [1.5, 7] and got["c"] == value["c"] and got["d"].shape == (0, 2)
        assert np.array_equal(got["e"], np.eye(3))
    with pytest.raises(FewshotError, match="cannot read v: "):
        load_pickle(pickle.dumps(value)[:-20], "v")


def test_malformed_pickles_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "pk"
    root.mkdir()
    f = root / "mini-imagenet-cache-train.pkl"
    cases = [({"images": 1}, "is not a mini-ImageNet pickle"),
             ({"image_data": np.zeros((2, 8, 8), np.uint8), "class_dict": {"n1": [0]}}, "must be a uint8 array"),
             ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n1": [0, 5]}},
              r"class n1 has image index 5 outside 'image_data' \(0..1\)"),
             ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n1": []}}, "class n1 has no images")]
    for value, msg in cases:
        f.write_bytes(pickle.dumps(value))
        with pytest.raises(FewshotError, match=msg):
            fsdata.load(str(root), cache=False)
    f.write_bytes(b"not a pickle")
    with pytest.raises(FewshotError, match="cannot read .*cache-train.pkl"):
        fsdata.load(str(root), cache=False)


# ------------------------------------------------------------------------------------------ labelled flat folders
def write_flat(root: Path, classes=(1, 2, 10), per_class: int = 4, size: int = 16) -> Path:
    """COIL-style flat folder ``root/obj<class>__<angle>.png`` (grey PNGs)."""
    root.mkdir(parents=True)
    for c in classes:
        for i in range(per_class):
            Image.fromarray(class_image(f"obj{c}", i, size)[..., 0]).save(root / f"obj{c}__{i * 5}.png")
    return root


def test_label_pattern_classes_from_file_names(tmp_path: Path) -> None:
    root = write_flat(tmp_path / "flat")
    (root / "README.txt").write_text("not an image: ignored")
    ds = fsdata.load(str(root), size=16, label_pattern=r"obj(\d+)__\d+\.png", cache=False)
    assert ds.names == ["1", "2", "10"] and ds.counts.tolist() == [4, 4, 4] and ds.groups is None
    want = np.asarray(Image.open(root / "obj10__15.png"))   # within a class: obj10__0, __5, __10, __15
    assert np.array_equal(ds.images(2)[3, 0].numpy(), want)
    rgb = fsdata.load(str(root), size=8, channels=3, label_pattern=r"^obj(\d+)", cache=False)
    assert rgb.image_shape == (3, 8, 8) and rgb.names == ["1", "2", "10"]


def test_label_pattern_errors(tmp_path: Path) -> None:
    root = write_flat(tmp_path / "flat")
    Image.new("L", (16, 16)).save(root / "background.png")
    Image.new("L", (16, 16)).save(root / "aaa_blank.png")
    with pytest.raises(FewshotError) as e:
        fsdata.load(str(root), label_pattern=r"obj(\d+)__", cache=False)
    assert str(e.value) == (f"2 of 14 images in {root} do not match --label-pattern 'obj(\\d+)__' (or its first "
                            "group is empty); the first is aaa_blank.png")
    with pytest.raises(FewshotError, match=re.escape("--label-pattern 'obj\\d+' has no group")):
        fsdata.load(str(root), label_pattern=r"obj\d+", cache=False)
    with pytest.raises(FewshotError, match=re.escape("--label-pattern 'obj(' is not a valid regular expression")):
        fsdata.load(str(root), label_pattern="obj(", cache=False)
    with pytest.raises(FewshotError, match="--label-pattern labels the images of a folder; --data glyphs"):
        fsdata.load("glyphs", label_pattern="(x)", cache=False)
    with pytest.raises(FewshotError, match="no such data folder: .*nowhere"):
        fsdata.load(str(tmp_path / "nowhere"), label_pattern="(x)", cache=False)


def test_label_sheet_with_and_without_header(tmp_path: Path) -> None:
    root = write_flat(tmp_path / "flat", classes=(3, 4), per_class=3)
    (root / "sub").mkdir()
    Image.fromarray(class_image("obj4", 9, 16)[..., 0]).save(root / "sub" / "extra.png")
    rows = [("obj3__0.png", "cup"), ("obj4__5.png", "ball"), ("obj3__10.png", "cup"), ("sub/extra.png", "ball"),
            ("obj4__0.png", "ball")]
    for header in (True, False):
        sheet = tmp_path / f"labels{header}.csv"
        sheet.write_text(("path,label\n" if header else "") + "\n".join(f"{p},{l}" for p, l in rows) + "\n\n")
        ds = fsdata.load(str(root), size=16, labels=str(sheet), cache=False)
        assert ds.names == ["ball", "cup"] and ds.counts.tolist() == [3, 2]
        # images of a class in the sheet's order; obj3__5.png and obj4__10.png are not listed: left out
        assert np.array_equal(ds.images(0)[1, 0].numpy(), np.asarray(Image.open(root / "sub" / "extra.png")))
        assert np.array_equal(ds.images(1)[1, 0].numpy(), np.asarray(Image.open(root / "obj3__10.png")))


def test_label_sheet_errors(tmp_path: Path) -> None:
    root = write_flat(tmp_path / "flat", classes=(3,), per_class=2)
    sheet = tmp_path / "labels.csv"
    sheet.write_text("filename,label\nobj3__0.png,a\nobj3__99.png,a\n")
    with pytest.raises(FewshotError, match=r"labels.csv, row 3: image obj3__99.png not found in .*flat"):
        fsdata.load(str(root), labels=str(sheet), cache=False)
    sheet.write_text("obj3__0.png,a\nobj3__5.png,b\nobj3__0.png,b\n")
    with pytest.raises(FewshotError, match="row 3: obj3__0.png is already listed in row 1"):
        fsdata.load(str(root), labels=str(sheet), cache=False)
    sheet.write_text("obj3__0.png,\n")
    with pytest.raises(FewshotError, match="row 1: expected path,label"):
        fsdata.load(str(root), labels=str(sheet), cache=False)
    sheet.write_text("path,label\n")
    with pytest.raises(FewshotError, match="lists no images"):
        fsdata.load(str(root), labels=str(sheet), cache=False)
    with pytest.raises(FewshotError, match="no such label sheet"):
        fsdata.load(str(root), labels=str(tmp_path / "missing.csv"), cache=False)
    with pytest.raises(FewshotError, match="either --labels FILE.csv or --label-pattern REGEX, not both"):
        fsdata.load(str(root), labels=str(sheet), label_pattern="(x)", cache=False)


def test_labelled_folders_are_cached_and_invalidated_by_changes(tmp_path: Path, monkeypatch) -> None:
    root = write_flat(tmp_path / "flat", classes=(1, 2), per_class=2)
    first = fsdata.load(str(root), size=16, label_pattern=r"obj(\d+)")
    decoded = []
    real = labeled.load_image
    monkeypatch.setattr(labeled, "load_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    again = fsdata.load(str(root), size=16, label_pattern=r"obj(\d+)")
    assert decoded == [] and again.names == first.names
    Image.new("L", (16, 16), 7).save(root / "obj2__9.png")
    grown = fsdata.load(str(root), size=16, label_pattern=r"obj(\d+)")
    assert grown.counts.tolist() == [2, 3] and len(decoded) == 5


# ------------------------------------------------------------------------------------------ the command line
def _cli(capsys, *args) -> tuple:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_then_eval_on_the_ravi_layout_with_the_published_split(ravi_root: Path, tmp_path: Path,
                                                                      capsys) -> None:
    run = tmp_path / "run"
    rc, out, err = _cli(capsys, "train", "protonet", "--data", ravi_root, "--size", "16", "--ways", "3",
                        "--shots", "1", "--queries", "2", "--episodes", "4", "--val-every", "2", "--val-ways", "3",
                        "--val-queries", "2", "--val-episodes", "3", "--test-ways", "3", "--test-queries", "2",
                        "--test-episodes", "10", "--hidden", "8", "--no-progress", "--out", run)
    assert rc == 0, err
    assert "test accuracy:" in out
    for part in ("train", "val", "test"):
        assert (run / f"classes_{part}.txt").read_text().split() == SPLIT[part]
    rc, out, err = _cli(capsys, "eval", run, "--ways", "3", "--shots", "2", "--queries", "2", "--episodes", "8",
                        "--no-progress")
    assert rc == 0 and "3-way 2-shot" in out, err
    res = json.loads(next((run / "eval").glob("3w2s*.json")).read_text())
    assert res["n"] == 8 and res["classes"] == len(SPLIT["test"])   # on the published test classes


def test_cli_errors_for_a_missing_image_and_a_bad_pattern(tmp_path: Path, capsys) -> None:
    root = write_ravi(tmp_path / "mini", per_class=2)
    (root / "images" / f"{SPLIT['train'][2]}00000001.jpg").unlink()
    rc, _, err = _cli(capsys, "train", "protonet", "--data", root, "--out", tmp_path / "r1", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fewshot: error: ") and f"{SPLIT['train'][2]}00000001.jpg" in err and "train.csv" in err
    flat = write_flat(tmp_path / "flat")
    rc, _, err = _cli(capsys, "train", "protonet", "--data", flat, "--label-pattern", r"obj\d+",
                      "--out", tmp_path / "r2", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "has no group" in err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_train_and_eval_a_flat_folder_by_label_pattern(tmp_path: Path, capsys) -> None:
    flat = write_flat(tmp_path / "flat", classes=tuple(range(1, 9)), per_class=4)
    run = tmp_path / "run"
    rc, out, err = _cli(capsys, "train", "protonet", "--data", flat, "--label-pattern", r"obj(\d+)__",
                        "--split", "fraction:0.5", "--val-fraction", "0", "--size", "16", "--ways", "3",
                        "--shots", "1", "--queries", "2", "--episodes", "3", "--val-every", "0",
                        "--test-ways", "3", "--test-queries", "2", "--test-episodes", "5", "--hidden", "8",
                        "--no-progress", "--out", run)
    assert rc == 0, err
    test_classes = (run / "classes_test.txt").read_text().split()
    assert len(test_classes) == 4 and set(test_classes) <= {str(c) for c in range(1, 9)}
    rc, out, err = _cli(capsys, "eval", run, "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "5",
                        "--no-progress")
    assert rc == 0 and "3-way 1-shot" in out, err
