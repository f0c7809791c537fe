"""The Omniglot loader on fake zips in the published layout, their extracted copies, and (when present)
the real small background sets in ../shared/data/omniglot. Downloads are simulated: no network is used."""
from __future__ import annotations

import hashlib
import importlib
import io
import shutil
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

import fewshot.data as fsdata
from conftest import OMNI_DRAWERS, OMNI_SETS, need_shared, write_omniglot_zip
from fewshot.errors import FewshotError

# ``fewshot.data`` re-exports the function ``omniglot``, which hides the module of the same name
om = importlib.import_module("fewshot.data.omniglot")

ALL_CHARS = sorted({(a, f) for s in OMNI_SETS.values() for a, chars in s.items() for f, _ in chars})


def _extract(zips: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for s in OMNI_SETS:
        with zipfile.ZipFile(zips / f"{s}.zip") as zf:
            zf.extractall(dest)
    return dest


def test_zips(omniglot_root: Path) -> None:
    ds = om.omniglot(omniglot_root, cache=False)
    assert ds.names == [f"{a}/{c}" for a, c in ALL_CHARS]
    assert len(ds) == 9 and ds.num_images == 9 * OMNI_DRAWERS
    assert ds.counts.tolist() == [OMNI_DRAWERS] * 9
    assert ds.image_shape == (1, 28, 28) and ds.data.dtype == torch.uint8
    assert ds.groups == [a for a, _ in ALL_CHARS]
    assert ds.group_names() == ["Balinese", "Greek", "Korean", "Tagalog"]
    assert ds.preprocess.invert is True and ds.preprocess.channels == 1


def test_shared_alphabet_is_loaded_once(omniglot_root: Path) -> None:
    ds = om.omniglot(omniglot_root, cache=False)
    greek = [n for n, g in zip(ds.names, ds.groups) if g == "Greek"]
    assert greek == ["Greek/character01", "Greek/character02", "Greek/character03"]
    assert len(set(ds.names)) == len(ds.names)
    for i, n in enumerate(ds.names):
        if n.startswith("Greek/"):
            assert int(ds.counts[i]) == OMNI_DRAWERS          # not 2 x drawers
    # every image appears once
    assert len({bytes(x.numpy()) for x in ds.data}) == ds.num_images


def test_strokes_are_bright_after_inversion(omniglot_root: Path) -> None:
    ds = om.omniglot(omniglot_root, cache=False)
    x = ds.data.float()
    assert x.mean() < 100                     # mostly background = 0
    assert int(ds.data.max()) == 255 and int(ds.data.min()) == 0
    full = om.omniglot(omniglot_root, size=105, cache=False)
    # at full size the pixels are exactly 255 - the 1-bit source: the corners are background
    assert set(torch.unique(full.data).tolist()) <= {0, 255}
    assert int(full.data[:, :, 0, 0].max()) == 0


@pytest.mark.parametrize("size, hw", [(20, (20, 20)), ((24, 32), (24, 32)), (105, (105, 105))])
def test_size_option(omniglot_root: Path, size, hw) -> None:
    ds = om.omniglot(omniglot_root, size=size, cache=False)
    assert ds.image_shape == (1, *hw) and ds.preprocess.size == hw


def test_extracted_folder_gives_the_same_data(omniglot_root: Path, tmp_path: Path) -> None:
    ext = _extract(omniglot_root, tmp_path / "ext")
    a = om.omniglot(omniglot_root, cache=False)
    b = om.omniglot(ext, cache=False)
    assert a.names == b.names and a.groups == b.groups and torch.equal(a.data, b.data)
    # one extracted set passed directly, and one set under another folder name
    c = om.omniglot(ext / "images_background_small1", cache=False)
    assert c.names == om.omniglot(omniglot_root, split="small1", cache=False).names
    renamed = tmp_path / "my_copy"
    shutil.copytree(ext / "images_background_small2", renamed)
    d = om.omniglot(renamed, cache=False)
    assert d.group_names() == ["Greek", "Tagalog"] and len(d) == 5


def test_one_zip_passed_directly(omniglot_root: Path) -> None:
    ds = om.omniglot(omniglot_root / "images_background_small2.zip", cache=False)
    assert ds.group_names() == ["Greek", "Tagalog"] and len(ds) == 5


@pytest.mark.parametrize("split, alphabets", [
    ("small1", ["Balinese", "Greek", "Korean"]),
    ("small2", ["Greek", "Tagalog"]),
    ("small", ["Balinese", "Greek", "Korean", "Tagalog"]),
    ("auto", ["Balinese", "Greek", "Korean", "Tagalog"]),
])
def test_splits(omniglot_root: Path, split: str, alphabets: list) -> None:
    ds = om.omniglot(omniglot_root, split=split, cache=False)
    assert ds.group_names() == alphabets


def test_auto_prefers_the_full_background_set(omniglot_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(omniglot_root, root, ignore=shutil.ignore_patterns(".*"))
    char = root / "images_background" / "Latin" / "character01"
    char.mkdir(parents=True)
    png = zipfile.ZipFile(root / "images_background_small1.zip").read(
        "images_background_small1/Korean/character01/0020_01.png")
    for d in (1, 2):
        (char / f"0001_{d:02d}.png").write_bytes(png)
    ds = om.omniglot(root, cache=False)
    assert ds.names == ["Latin/character01"] and ds.counts.tolist() == [2]
    assert len(om.omniglot(root, split="small", cache=False)) == 9


def test_missing_set_says_where_to_put_files(omniglot_root: Path) -> None:
    with pytest.raises(FewshotError) as e:
        om.omniglot(omniglot_root, split="evaluation", cache=False)
    msg = str(e.value)
    assert "images_evaluation" in msg and "images_evaluation.zip" in msg and str(omniglot_root) in msg
    assert "put" in msg and "\n" not in msg


def test_no_files_and_missing_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FewshotError, match="no Omniglot files in") as e:
        om.omniglot(tmp_path / "empty", cache=False)
    assert "images_background.zip" in str(e.value)
    with pytest.raises(FewshotError, match="no such file or folder") as e:
        om.omniglot(tmp_path / "nowhere", cache=False)
    assert "nowhere" in str(e.value)
    with pytest.raises(FewshotError, match="unknown Omniglot split"):
        om.omniglot(tmp_path / "empty", split="train", cache=False)


def test_default_root_from_environment(omniglot_root: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FewshotError, match="FEWSHOT_DATA"):
        om.omniglot(cache=False)
    monkeypatch.setenv("FEWSHOT_DATA", str(omniglot_root))
    assert len(om.omniglot(cache=False)) == 9
    holder = tmp_path / "datasets"
    shutil.copytree(omniglot_root, holder / "omniglot", ignore=shutil.ignore_patterns(".*"))
    monkeypatch.setenv("FEWSHOT_DATA", str(holder))
    assert len(fsdata.load("omniglot", cache=False)) == 9


def test_generic_load_recognises_omniglot(omniglot_root: Path) -> None:
    assert fsdata.kind_of(str(omniglot_root)) == "omniglot"
    assert fsdata.kind_of(str(omniglot_root / "images_background_small1.zip")) == "omniglot"
    ds = fsdata.load(str(omniglot_root), size=16, cache=False)
    assert len(ds) == 9 and ds.image_shape == (1, 16, 16)


def test_cache_reuse(omniglot_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = om.omniglot(omniglot_root, cache=cache)
    assert len(list(cache.glob("omniglot-*.pt"))) == 1
    b = om.omniglot(omniglot_root, cache=cache)
    assert torch.equal(a.data, b.data) and a.names == b.names and a.groups == b.groups
    om.omniglot(omniglot_root, size=20, cache=cache)
    assert len(list(cache.glob("omniglot-*.pt"))) == 2


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    bad = "images_background_small1/Korean/character09/0099_01.png"
    write_omniglot_zip(tmp_path / "images_background_small1.zip", "images_background_small1", {bad: b"not a png"})
    with pytest.raises(FewshotError, match="cannot read image") as e:
        om.omniglot(tmp_path, cache=False)
    assert bad in str(e.value) and "\n" not in str(e.value)


def test_empty_character_folder(omniglot_root: Path, tmp_path: Path) -> None:
    ext = _extract(omniglot_root, tmp_path / "ext")
    empty = ext / "images_background_small2" / "Tagalog" / "character07"
    empty.mkdir()
    with pytest.raises(FewshotError, match="has no images") as e:
        om.omniglot(ext, cache=False)
    assert str(empty) in str(e.value)


@pytest.mark.parametrize("member", ["images_background_small1/../../evil.png", "/etc/evil.png",
                                    "C:/evil.png", "images_background_small1\\..\\evil.png"])
def test_unsafe_zip_members_are_refused(tmp_path: Path, member: str) -> None:
    z = write_omniglot_zip(tmp_path / "images_background_small1.zip", "images_background_small1",
                           {member: b"x"})
    assert member in zipfile.ZipFile(z).namelist()
    with pytest.raises(FewshotError, match="refusing unsafe path") as e:
        om.omniglot(tmp_path, cache=False)
    assert repr(member) in str(e.value)


def test_broken_zip(tmp_path: Path) -> None:
    (tmp_path / "images_background_small1.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(FewshotError, match="cannot read zip"):
        om.omniglot(tmp_path, cache=False)


# ------------------------------------------------------------------------------------------ downloads
class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_without_network_fails_fast(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError(OSError("Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    t = time.perf_counter()
    with pytest.raises(FewshotError) as e:
        om.download_file("images_background_small1", tmp_path / "dl")
    assert time.perf_counter() - t < 2
    msg = str(e.value)
    assert "cannot download" in msg and "images_background_small1.zip" in msg and str(tmp_path / "dl") in msg
    assert "\n" not in msg
    assert len(calls) == 1 and calls[0][0].startswith(om.BASE_URL) and calls[0][1]
    assert not list((tmp_path / "dl").iterdir())          # no partial file left behind
    # the same through omniglot(download=True) and with a plain OSError
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    with pytest.raises(FewshotError, match="cannot download"):
        om.omniglot(tmp_path / "dl2", split="small", download=True, cache=False)


def test_download_checksum_mismatch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"corrupted bytes"))
    with pytest.raises(FewshotError, match="checksum mismatch"):
        om.download_file("images_evaluation", tmp_path)
    assert not list(tmp_path.iterdir())


def test_download_success_and_no_op_when_present(tmp_path: Path, omniglot_root: Path, monkeypatch) -> None:
    payload = (omniglot_root / "images_background_small1.zip").read_bytes()
    rel, _ = om.FILES["images_background_small1"]
    monkeypatch.setitem(om.FILES, "images_background_small1",
                        (rel, ("sha256", hashlib.sha256(payload).hexdigest())))
    urls = []

    def fake(url, timeout=None):
        urls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    dest = om.download_file("images_background_small1", tmp_path)
    assert dest == tmp_path / "images_background_small1.zip" and dest.read_bytes() == payload
    assert urls == [om.BASE_URL + "images_background_small1.zip"]
    om.download_file("images_background_small1", tmp_path)
    assert len(urls) == 1                                   # present: nothing fetched
    assert len(om.omniglot(tmp_path, split="small1", download=True, cache=False)) == 7
    with pytest.raises(FewshotError, match="unknown Omniglot file"):
        om.download_file("images_nope", tmp_path)


def test_published_checksums_are_recorded() -> None:
    for name, (rel, (algo, digest)) in om.FILES.items():
        assert rel.endswith(".zip")
        assert algo in ("sha256", "md5") and len(digest) == {"sha256": 64, "md5": 32}[algo]


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = need_shared("omniglot")
    # decode into a private cache: nothing is written next to the shared files
    return om.omniglot(root, cache=tmp_path_factory.mktemp("omni-real-cache"))


def test_real_small_sets(real) -> None:
    assert len(real) == 242 and real.num_images == 4840
    assert real.counts.tolist() == [20] * 242
    assert len(real.group_names()) == 8
    per = {g: real.groups.count(g) for g in real.group_names()}
    assert per["Korean"] == 40 and per["Tagalog"] == 17
    assert set(per) == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin", "Japanese_(katakana)",
                        "Sanskrit", "Tagalog"}
    assert real.image_shape == (1, 28, 28)
    assert float(real.data.float().mean()) < 60 and int(real.data.max()) == 255


def test_real_small1_and_small2(real) -> None:
    root = need_shared("omniglot")
    s1 = om.omniglot(root / "images_background_small1.zip", size=14, cache=False)
    assert s1.group_names() == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert set(s1.names) <= set(real.names)
