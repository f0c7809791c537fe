"""load_lake_runs on small fake copies of all_runs.zip, in the published layout."""
from __future__ import annotations

import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from fewshot.data.images import Preprocess
from fewshot.data.lake import LakeRun, load_lake_runs
from fewshot.errors import FewshotError

N_RUNS, N_CLASSES = 3, 5
PRE = Preprocess(size=(28, 28), channels=1, invert=True)


def _strokes(seed: int) -> Image.Image:
    """A 105x105 black-on-white 'character': a few random thick strokes."""
    rng = random.Random(seed)
    im = Image.new("L", (105, 105), 255)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 4)):
        pts = [(rng.randint(10, 95), rng.randint(10, 95)) for _ in range(rng.randint(2, 4))]
        d.line(pts, fill=0, width=5)
    return im


def make_runs(base: Path, n_runs: int = N_RUNS, n_classes: int = N_CLASSES) -> dict:
    """Write run01.. under ``base`` like all_runs.zip; returns {run: {test name: training name}}."""
    truth = {}
    for r in range(1, n_runs + 1):
        run = f"run{r:02d}"
        (base / run / "training").mkdir(parents=True)
        (base / run / "test").mkdir()
        perm = list(range(1, n_classes + 1))
        random.Random(r).shuffle(perm)
        lines, answers = [], {}
        for c in range(1, n_classes + 1):
            _strokes(100 * r + c).save(base / run / "training" / f"class{c:02d}.png")
        for i, c in enumerate(perm, 1):
            # the query is the very image of its class, so alignment can be checked exactly
            _strokes(100 * r + c).save(base / run / "test" / f"item{i:02d}.png")
            lines.append(f"{run}/test/item{i:02d}.png {run}/training/class{c:02d}.png")
            answers[f"{run}/test/item{i:02d}.png"] = f"{run}/training/class{c:02d}.png"
        (base / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        truth[run] = answers
    return truth


def zip_folder(src: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        if prefix:
            zf.writestr(prefix.rstrip("/") + "/", "")
        for p in sorted(src.rglob("*")):
            arc = prefix + p.relative_to(src).as_posix()
            if p.is_dir():
                zf.writestr(arc + "/", "")
            else:
                zf.write(p, arc)
    return dest


@pytest.fixture
def runs_dir(tmp_path: Path) -> tuple[Path, dict]:
    base = tmp_path / "extracted"
    base.mkdir()
    return base, make_runs(base)


def check_runs(runs: list, truth: dict) -> None:
    assert [r.name for r in runs] == sorted(truth)
    for run in runs:
        assert isinstance(run, LakeRun)
        assert run.train.shape == (N_CLASSES, 1, 28, 28) and run.train.dtype == torch.uint8
        assert run.test.shape == (N_CLASSES, 1, 28, 28) and run.test.dtype == torch.uint8
        assert run.labels.dtype == torch.long and run.labels.shape == (N_CLASSES,)
        assert run.train_names == [f"{run.name}/training/class{c:02d}.png" for c in range(1, N_CLASSES + 1)]
        assert run.test_names == sorted(truth[run.name])
        for i, t in enumerate(run.test_names):
            assert run.train_names[run.labels[i]] == truth[run.name][t]
            assert torch.equal(run.test[i], run.train[run.labels[i]])
        # inverted: strokes bright on a dark background
        x = run.train.float()
        assert x.mean() < 80 and x.amax() > 200
        # the classes differ from one another
        assert len({bytes(run.train[c].numpy()) for c in range(N_CLASSES)}) == N_CLASSES


def test_extracted_folder(runs_dir) -> None:
    base, truth = runs_dir
    check_runs(load_lake_runs(base, PRE), truth)


def test_extracted_folder_one_level_down(runs_dir, tmp_path: Path) -> None:
    base, truth = runs_dir
    outer = tmp_path / "outer"
    shutil.copytree(base, outer / "all_runs")
    (outer / ".junk").mkdir()
    check_runs(load_lake_runs(outer, PRE), truth)


@pytest.mark.parametrize("prefix", ["", "all_runs/"])
def test_zip(runs_dir, tmp_path: Path, prefix: str) -> None:
    base, truth = runs_dir
    z = zip_folder(base, tmp_path / "all_runs.zip", prefix)
    runs = load_lake_runs(z, PRE)
    check_runs(runs, truth)
    # the same pixels as from the folder
    ref = load_lake_runs(base, PRE)
    for a, b in zip(runs, ref):
        assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test) and torch.equal(a.labels, b.labels)


def test_folder_holding_the_zip(runs_dir, tmp_path: Path) -> None:
    base, truth = runs_dir
    holder = tmp_path / "downloads"
    holder.mkdir()
    zip_folder(base, holder / "all_runs.zip", "all_runs/")
    check_runs(load_lake_runs(holder, PRE), truth)


def test_full_size_without_inversion(runs_dir) -> None:
    base, _ = runs_dir
    runs = load_lake_runs(base, Preprocess(size=(105, 105), channels=1, invert=False))
    x = runs[0].train
    assert x.shape == (N_CLASSES, 1, 105, 105)
    assert int(x.max()) == 255 and int(x.min()) == 0 and x.float().mean() > 170


def test_label_order_in_file_does_not_matter(runs_dir) -> None:
    base, truth = runs_dir
    f = base / "run02" / "class_labels.txt"
    lines = f.read_text().splitlines()
    f.write_text("\r\n".join(reversed(lines)) + "\r\n\r\n")
    check_runs(load_lake_runs(base, PRE), truth)


def test_nothing_found(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "run01").mkdir(parents=True)  # a run folder without class_labels.txt
    with pytest.raises(FewshotError, match="no Omniglot one-shot runs") as e:
        load_lake_runs(empty, PRE)
    assert str(empty) in str(e.value)


def test_zip_without_runs(tmp_path: Path) -> None:
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/b/c.txt", "x")
    with pytest.raises(FewshotError, match="no Omniglot one-shot runs") as e:
        load_lake_runs(z, PRE)
    assert str(z) in str(e.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="no such file or folder") as e:
        load_lake_runs(tmp_path / "gone.zip", PRE)
    assert "gone.zip" in str(e.value)


def test_zip_with_parent_member_is_refused(runs_dir, tmp_path: Path) -> None:
    base, _ = runs_dir
    z = zip_folder(base, tmp_path / "all_runs.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(FewshotError, match="unsafe") as e:
        load_lake_runs(z, PRE)
    assert "../evil.png" in str(e.value)


def test_label_line_with_parent_path_is_refused(runs_dir) -> None:
    base, _ = runs_dir
    f = base / "run01" / "class_labels.txt"
    f.write_text("../../etc/passwd run01/training/class01.png\n")
    with pytest.raises(FewshotError, match="unsafe") as e:
        load_lake_runs(base, PRE)
    assert "run01" in str(e.value) and "line 1" in str(e.value)


def test_malformed_line(runs_dir) -> None:
    base, _ = runs_dir
    f = base / "run02" / "class_labels.txt"
    lines = f.read_text().splitlines()
    lines[2] = "run02/test/item03.png"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(FewshotError, match="malformed line 3") as e:
        load_lake_runs(base, PRE)
    msg = str(e.value)
    assert "run02" in msg and "class_labels.txt" in msg and "\n" not in msg


def test_malformed_line_in_zip(runs_dir, tmp_path: Path) -> None:
    base, _ = runs_dir
    f = base / "run03" / "class_labels.txt"
    f.write_text(f.read_text() + "run03/test/item01.png run03/training/class01.png extra\n")
    z = zip_folder(base, tmp_path / "all_runs.zip", "all_runs/")
    with pytest.raises(FewshotError, match=f"malformed line {N_CLASSES + 1}") as e:
        load_lake_runs(z, PRE)
    assert "run03" in str(e.value) and str(z) in str(e.value)


@pytest.mark.parametrize("which", ["test", "training"])
def test_label_references_missing_image(runs_dir, which: str) -> None:
    base, _ = runs_dir
    victim = base / "run01" / which / ("item02.png" if which == "test" else "class04.png")
    lines = (base / "run01" / "class_labels.txt").read_text().splitlines()
    line_no = next(i for i, ln in enumerate(lines, 1) if victim.name in ln)
    victim.unlink()
    with pytest.raises(FewshotError, match="missing image") as e:
        load_lake_runs(base, PRE)
    msg = str(e.value)
    assert victim.name in msg and "run01" in msg and f"line {line_no}" in msg


def test_unreadable_image_is_named(runs_dir, tmp_path: Path) -> None:
    base, _ = runs_dir
    (base / "run02" / "training" / "class03.png").write_bytes(b"not a png")
    z = zip_folder(base, tmp_path / "all_runs.zip")
    with pytest.raises(FewshotError, match="cannot read image") as e:
        load_lake_runs(z, PRE)
    assert "run02/training/class03.png" in str(e.value)
