"""image_folder / list_images / load_files on real image files written with Pillow."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewshot.data.folder as folder_mod
from fewshot.data.folder import image_folder, list_images, load_files
from fewshot.data.images import Preprocess
from fewshot.errors import FewshotError


def _img(mode: str, size: tuple, seed: int) -> Image.Image:
    """A light image with a dark square at a seed-dependent place."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    a = np.full(shape, 230, dtype=np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    a[y:y + h // 3, x:x + w // 3] = 20
    return Image.fromarray(a, mode)


def _save(path: Path, mode: str, size: tuple, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = _img(mode, size, seed)
    if path.suffix == ".pgm":
        im = im.convert("L")
    im.save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{alpha,beta,gamma}/… in PNG, JPEG, PGM and BMP, grey and RGB, of different sizes."""
    root = tmp_path / "data"
    _save(root / "beta" / "b1.png", "RGB", (40, 30), 1)
    _save(root / "beta" / "b2.jpg", "RGB", (64, 64), 2)
    _save(root / "beta" / "b3.bmp", "L", (17, 23), 3)
    _save(root / "alpha" / "a1.pgm", "L", (28, 28), 4)
    _save(root / "alpha" / "a2.jpeg", "L", (50, 20), 5)
    _save(root / "gamma" / "g1.BMP", "RGB", (33, 33), 6)
    # ignored: hidden files and folders, non-image files
    _save(root / "alpha" / ".hidden.png", "L", (10, 10), 7)
    _save(root / ".trash" / "x.png", "L", (10, 10), 8)
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("readme")
    return root


def test_shapes_and_class_names(tree: Path) -> None:
    ds = image_folder(tree, size=28, channels=1, cache=False)
    assert ds.names == ["alpha", "beta", "gamma"]
    assert ds.counts.tolist() == [2, 3, 1]
    assert ds.data.dtype == torch.uint8
    assert ds.image_shape == (1, 28, 28)
    assert ds.preprocess == Preprocess(size=(28, 28), channels=1, invert=False)
    assert str(tree) in ds.source


def test_non_square_size_and_rgb(tree: Path) -> None:
    ds = image_folder(tree, size=(20, 36), channels=3, cache=False)
    assert ds.image_shape == (3, 20, 36)
    # grey images are replicated into three equal channels
    alpha = ds.images(0).int()
    assert torch.equal(alpha[:, 0], alpha[:, 1]) and torch.equal(alpha[:, 1], alpha[:, 2])


def test_invert(tree: Path) -> None:
    plain = image_folder(tree, size=16, cache=False)
    inv = image_folder(tree, size=16, invert=True, cache=False)
    assert torch.equal(inv.data, 255 - plain.data)
    # light background becomes dark
    assert plain.data.float().mean() > 128 > inv.data.float().mean()


def test_order_within_class_is_by_file_name(tree: Path) -> None:
    ds = image_folder(tree, size=(30, 40), channels=3, cache=False)
    pre = Preprocess(size=(30, 40), channels=3)
    expected = load_files(list_images(tree / "beta"), pre)
    assert torch.equal(ds.images(1), expected)


def test_cache_reuse_and_invalidation(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "usercache"))
    calls = []
    real = folder_mod.load_image

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(folder_mod, "load_image", counting)
    first = image_folder(tree, size=28)
    assert len(calls) == 6
    assert list((tree / ".fewshot-cache").glob("folder-*.pt"))
    second = image_folder(tree, size=28)
    assert len(calls) == 6, "second load should come from the cache"
    assert torch.equal(first.data, second.data) and first.names == second.names
    # the cache folder is hidden: it is not taken for a class
    assert second.names == ["alpha", "beta", "gamma"]

    # other parameters: a separate cache entry
    image_folder(tree, size=14)
    assert len(calls) == 12

    # a new file inside a class folder (root mtime unchanged) invalidates the cache
    _save(tree / "gamma" / "g2.png", "L", (20, 20), 9)
    third = image_folder(tree, size=28)
    assert len(calls) == 12 + 7
    assert third.counts.tolist() == [2, 3, 2]

    # rewriting a file in place (new size/mtime) also invalidates it
    p = tree / "alpha" / "a1.pgm"
    _save(p, "L", (31, 31), 10)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    image_folder(tree, size=28)
    assert len(calls) == 12 + 7 + 7


def test_cache_in_explicit_folder(tree: Path, tmp_path: Path) -> None:
    cdir = tmp_path / "mycache"
    a = image_folder(tree, size=28, cache=cdir)
    assert len(list(cdir.glob("folder-*.pt"))) == 1
    b = image_folder(tree, size=28, cache=cdir)
    assert torch.equal(a.data, b.data)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FewshotError, match="no such folder") as e:
        image_folder(missing, cache=False)
    assert str(missing) in str(e.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    f = _save(tmp_path / "one.png", "L", (10, 10), 0)
    with pytest.raises(FewshotError, match="not a folder") as e:
        image_folder(f, cache=False)
    assert str(f) in str(e.value)


def test_no_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _save(root / "a.png", "L", (10, 10), 0)
    (root / ".hidden").mkdir()
    with pytest.raises(FewshotError, match="no class subfolders") as e:
        image_folder(root, cache=False)
    assert str(root) in str(e.value)
    assert "1 images" in str(e.value)


def test_empty_class_folder(tree: Path) -> None:
    empty = tree / "delta"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    _save(empty / ".hidden.png", "L", (10, 10), 0)
    with pytest.raises(FewshotError, match="class folder .* has no images") as e:
        image_folder(tree, cache=False)
    assert str(empty) in str(e.value)


def test_unreadable_image(tree: Path) -> None:
    bad = tree / "beta" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(FewshotError, match="cannot read image") as e:
        image_folder(tree, cache=False)
    assert str(bad) in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_channels(tree: Path) -> None:
    with pytest.raises(FewshotError, match="channels"):
        image_folder(tree, channels=2, cache=False)


def test_list_images(tree: Path) -> None:
    files = list_images(tree / "alpha")
    assert [p.name for p in files] == ["a1.pgm", "a2.jpeg"]
    single = tree / "beta" / "b2.jpg"
    assert list_images(single) == [single]
    with pytest.raises(FewshotError, match="no such file or folder") as e:
        list_images(tree / "missing.png")
    assert "missing.png" in str(e.value)
    docs = tree / "docs"
    docs.mkdir()
    (docs / "readme.txt").write_text("x")
    with pytest.raises(FewshotError, match="no images in folder") as e:
        list_images(docs)
    assert str(docs) in str(e.value)


def test_load_files(tree: Path) -> None:
    pre = Preprocess(size=(12, 9), channels=3, invert=True)
    files = list_images(tree / "beta")
    x = load_files(files, pre)
    assert x.shape == (3, 3, 12, 9) and x.dtype == torch.uint8
    assert load_files([], pre).shape == (0, 3, 12, 9)
    with pytest.raises(FewshotError, match="image not found") as e:
        load_files([tree / "beta" / "gone.png"], pre)
    assert "gone.png" in str(e.value)
