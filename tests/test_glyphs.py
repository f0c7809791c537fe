"""Tests of the built-in glyphs data set (rendered from matplotlib's fonts)."""
from __future__ import annotations

import importlib
import re
import time
import unicodedata

import pytest
import torch
from PIL import Image

from fewshot.data.images import Preprocess, load_image
from fewshot.errors import FewshotError

# ``fewshot.data`` re-exports the function ``glyphs``, which hides the module of the same name
G = importlib.import_module("fewshot.data.glyphs")

NAME_RE = re.compile(r"^U\+([0-9A-F]{4,6})( [A-Z0-9 \-]+)?$")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("glyphs-cache")


@pytest.fixture(scope="module")
def full(cache_root):
    """The default data set, built once into a fresh cache folder."""
    t = time.perf_counter()
    ds = G.glyphs(cache=cache_root)
    print(f"glyphs default build: {len(ds)} classes in {time.perf_counter() - t:.1f} s")
    return ds


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "env-cache"))


def code_point(name: str) -> int:
    return int(name.split(" ", 1)[0][2:], 16)


def test_fonts_used():
    names = [f.name for f in G.font_files()]
    assert len(names) >= 8
    assert all(n.startswith(("DejaVu", "STIXGeneral")) for n in names)
    assert "DejaVuSans.ttf" in names and "STIXGeneral.ttf" in names
    assert not any(n.startswith(("cm", "STIXSiz", "STIXNonUni", "LastResort")) for n in names)


def test_defaults_have_many_sorted_classes(full):
    assert len(full) >= 1000
    cps = [code_point(n) for n in full.names]
    assert cps == sorted(cps) and len(set(cps)) == len(cps)
    for n, cp in zip(full.names, cps):
        assert NAME_RE.match(n), n
        assert unicodedata.category(chr(cp)) not in G.EXCLUDED_CATEGORIES, n
    assert "U+0041 LATIN CAPITAL LETTER A" in full.names
    assert "U+0030 DIGIT ZERO" in full.names
    # look-alikes of earlier classes are dropped
    assert "U+0391 GREEK CAPITAL LETTER ALPHA" not in full.names
    assert "U+2081 SUBSCRIPT ONE" not in full.names


def test_layout_and_metadata(full):
    assert full.data.dtype == torch.uint8
    assert full.data.shape == (len(full) * 20, 1, 28, 28)
    assert full.counts.tolist() == [20] * len(full)
    assert full.preprocess == Preprocess(size=(28, 28), channels=1, invert=True)
    assert full.source == "glyphs (matplotlib fonts, seed 0)"


def test_images_are_bright_strokes_on_black(full):
    x = full.data[:, 0].to(torch.int32)
    ink = x.flatten(1).sum(1) / 255.0
    assert ink.min() >= 10, "an image holds almost no ink"
    assert x.flatten(1).amax(1).min() >= 100
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)
    assert border.float().mean() < 5  # the glyph stays inside the canvas
    assert (x.flatten(1).median(1).values == 0).float().mean() > 0.9  # black background


def test_images_within_a_class_differ(full):
    x = full.data.flatten(1)
    for c in range(len(full)):
        imgs = x[full.offsets[c]:full.offsets[c] + 20]
        assert len(torch.unique(imgs, dim=0)) == 20, full.names[c]


def test_groups_and_split(full):
    assert full.groups is not None and len(full.groups) == len(full)
    groups = set(full.group_names())
    assert {"LATIN", "GREEK", "CYRILLIC"} <= groups
    assert full.groups[full.names.index("U+0041 LATIN CAPITAL LETTER A")] == "LATIN"
    train, val, test = full.split_by_group(test=["GREEK"], val=["CYRILLIC"])
    assert set(test.groups) == {"GREEK"} and set(val.groups) == {"CYRILLIC"}
    assert not {"GREEK", "CYRILLIC"} & set(train.groups)
    assert len(train) + len(val) + len(test) == len(full)


def test_cache_hit_is_fast_and_equal(full, cache_root):
    t = time.perf_counter()
    again = G.glyphs(cache=cache_root)
    took = time.perf_counter() - t
    print(f"glyphs cached load: {took:.3f} s")
    assert took < 1.0
    assert torch.equal(again.data, full.data)
    assert again.names == full.names and again.groups == full.groups
    assert again.preprocess == full.preprocess and again.source == full.source


def test_deterministic_in_seed():
    a = G.glyphs(max_classes=40, per_class=6, seed=3, cache=False)
    b = G.glyphs(max_classes=40, per_class=6, seed=3, cache=False)
    c = G.glyphs(max_classes=40, per_class=6, seed=4, cache=False)
    assert torch.equal(a.data, b.data)
    assert a.names == c.names
    assert not torch.equal(a.data, c.data)


def test_smaller_sets_are_prefixes(full):
    small = G.glyphs(max_classes=30, per_class=7, cache=False)
    assert small.names == full.names[:30] and small.groups == full.groups[:30]
    for c in range(30):
        assert torch.equal(small.images(c), full.images(c)[:7])


def test_other_sizes_keep_the_classes(full):
    ds = G.glyphs(size=(20, 32), max_classes=12, per_class=3, cache=False)
    assert ds.data.shape == (36, 1, 20, 32)
    assert ds.preprocess.size == (20, 32)
    assert ds.names == full.names[:12]
    assert (ds.data.flatten(1).sum(1) > 0).all()


def test_default_cache_goes_to_env_folder(tmp_path):
    G.glyphs(max_classes=5, per_class=2)
    assert list((tmp_path / "env-cache").glob("glyphs-*.pt"))


def test_raw_black_on_white_files_load_like_the_data(full, tmp_path):
    img = full.images(0)[3]
    path = tmp_path / "raw.png"
    Image.fromarray(255 - img[0].numpy()).save(path)  # how such a glyph looks as a normal image file
    assert torch.equal(load_image(path, full.preprocess), img)


@pytest.mark.parametrize("kwargs", [{"per_class": 0}, {"min_fonts": 0}, {"min_fonts": 1000},
                                    {"max_classes": 0}, {"seed": 1.5}, {"per_class": True}])
def test_bad_arguments(kwargs):
    with pytest.raises(FewshotError):
        G.glyphs(cache=False, **kwargs)


def test_min_fonts_is_respected():
    files = G.font_files()
    cover = G.font_coverage(files)
    ds = G.glyphs(min_fonts=14, max_classes=10, per_class=2, cache=False)
    assert len(ds) == 10
    assert all(len(cover[code_point(name)]) >= 14 for name in ds.names)
    assert (ds.data.flatten(1).amax(1) > 100).all()
