"""The bad-input catalogue of issue 13, table-driven: every case runs ``fewshot ...`` in-process and must end
with exit status 2, one line ``fewshot: error: ...`` on stderr that names the culprit (the flag, key or
file), no traceback, and nothing the user owns changed (every input file and folder is hashed before and
after; the run folders the cases read count as the user's too). The closed pipe needs a real process.

Below the table: the inputs that must now be *accepted* (``lr: 1e-3`` in YAML, 16-bit PNGs, derived
validation/test queries, ``--split none``, maml with 3 ways) and the memory bound of zip members.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import make_image_folder, write_omniglot_zip
from fewshot.cli import main
from fewshot.config import RunConfig
from fewshot.data import safezip
from fewshot.data.images import Preprocess, load_image
from fewshot.errors import FewshotError

#: tiny training settings: 3-way 1-shot 2-query episodes, 2 steps, no validation, no final test
TINY = ["--size", "16", "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "2", "--val-every", "0",
        "--hidden", "8", "--split", "fraction:0.5", "--test-ways", "3", "--test-queries", "2",
        "--test-episodes", "5", "--no-progress"]


def run_cli(capsys, *args) -> tuple:
    """(exit status, stdout, stderr) of ``fewshot ARGS`` run in-process."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:                 # argparse: bad arguments
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(*roots: Path) -> dict:
    """Every file (sha256) and folder under ``roots`` by path; fewshot's decoded-data caches
    (``.fewshot-cache``) are left out, they are not the user's."""
    state = {}
    for root in roots:
        if root.is_file():
            state[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            state[str(root)] = None
            continue
        for p in sorted(root.rglob("*")):
            if ".fewshot-cache" in p.parts:
                continue
            state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


# ------------------------------------------------------------------------------------------ inputs
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 8-bit grey pixels (its data is one tiny row): enough
    for Pillow to judge its size on opening."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def add_zero_member(archive: Path, name: str, n_bytes: int) -> None:
    """Append member ``name`` of ``n_bytes`` zero bytes, deflated (a zip bomb's shape), to ``archive``."""
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(name, "w", force_zip64=n_bytes > (1 << 31)) as fh:
            chunk = bytes(1 << 20)
            for i in range(0, n_bytes, len(chunk)):
                fh.write(chunk[:min(len(chunk), n_bytes - i)])


@dataclass
class Ctx:
    """What a case may use: a private folder, the shared image folder, and trained runs (copied on
    request, so a case may damage its copy)."""
    tmp: Path
    images: Path          #: 8 classes x 10 grey PNGs (read-only: hashed like the rest)
    image_run: Path       #: a protonet run on ``images``
    sine_run: Path        #: a maml run on the sine task family
    bomb_zip: Path        #: an Omniglot zip with a 200 MB all-zero member

    def copy_run(self, which: Path) -> Path:
        return Path(shutil.copytree(which, self.tmp / "run"))

    def recipe(self, text: str | bytes) -> Path:
        p = self.tmp / "recipe.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def folder(self, **kw) -> Path:
        return make_image_folder(self.tmp / "data", size=16, **kw)

    def train(self, *extra, data=None) -> list:
        return ["train", "protonet", "--data", data or self.images, "--out", self.tmp / "out", *TINY, *extra]


def _damaged_preprocess(c: Ctx) -> list:
    run = c.copy_run(c.image_run)
    path = run / "checkpoints" / "best.pt"
    ck = torch.load(path, weights_only=True)
    ck["preprocess"]["size"] = ["sixteen", 16]
    torch.save(ck, path)
    return ["eval", run, "--episodes", "5", "--no-progress"]


def _other_method_checkpoint(c: Ctx) -> list:
    run = c.copy_run(c.image_run)
    path = run / "checkpoints" / "best.pt"
    ck = torch.load(path, weights_only=True)
    ck["method"] = "maml"
    torch.save(ck, path)
    return ["eval", run, "--episodes", "5", "--no-progress"]


class Payload:
    """Unpickling this would create a file: a checkpoint holding it must be refused."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_checkpoint(c: Ctx) -> list:
    run = c.copy_run(c.image_run)
    path = run / "checkpoints" / "best.pt"
    ck = torch.load(path, weights_only=True)
    ck["extra"] = Payload(c.tmp / "pwned")
    torch.save(ck, path)
    return ["eval", run, "--no-progress"]


def _bomb_image(c: Ctx) -> list:
    d = c.folder(n_classes=4, per_class=4)
    (d / "class_01" / "huge.png").write_bytes(png_claiming(20000, 20000))
    return c.train(data=d)


def _unreadable_image(c: Ctx) -> list:
    d = c.folder(n_classes=4, per_class=4)
    (d / "class_02" / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return c.train(data=d)


def _empty_class(c: Ctx) -> list:
    d = c.folder(n_classes=4, per_class=4)
    (d / "class_09").mkdir()
    return c.train(data=d)


def _split_none_run(c: Ctx) -> list:
    rc = main([str(a) for a in c.train("--split", "none", "--val-fraction", "0", "--no-eval",
                                       "--out", c.tmp / "all")])
    assert rc == 0
    return ["eval", c.tmp / "all", "--no-progress"]


def _predict_into_folder(c: Ctx) -> list:
    (c.tmp / "preds").mkdir()
    sup = c.tmp / "support"
    for cls in ("class_00", "class_01"):
        (sup / cls).mkdir(parents=True)
        shutil.copy(c.images / cls / "img00.png", sup / cls / "a.png")
    return ["predict", c.image_run, "--support", sup, "--query", c.images / "class_00" / "img01.png",
            "--out", c.tmp / "preds"]


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], list]                 #: builds the bad input under ctx.tmp, returns the argv
    names: Callable[[Ctx], tuple]               #: what the message must contain (the culprit)


CASES = [
    # -------------------------------------------------- were tracebacks
    Case("yaml-ways-three", lambda c: ["train", "--config", c.recipe("method: protonet\nways: three\n")],
         lambda c: ("recipe.yaml", "ways", "'three'")),
    Case("yaml-episodes-quoted", lambda c: ["train", "--config", c.recipe('method: protonet\nepisodes: "3"\n')],
         lambda c: ("recipe.yaml", "episodes", "an integer", "'3'")),
    Case("yaml-lr-quoted", lambda c: ["train", "--config", c.recipe('method: protonet\nlr: "1e-3"\n')],
         lambda c: ("recipe.yaml", "lr", "a number", "'1e-3'")),
    Case("yaml-binary", lambda c: ["train", "--config", c.recipe(b"ways: 5\n\xff\xfe\x00\x81lr: \x80\n")],
         lambda c: ("recipe.yaml", "not UTF-8")),
    Case("yaml-control-chars", lambda c: ["train", "--config", c.recipe(b"ways: 5\x00\x07\n")],
         lambda c: ("recipe.yaml", "cannot parse")),
    Case("queries-0", lambda c: c.train("--queries", "0"), lambda c: ("--queries", "at least 1")),
    Case("size-0", lambda c: c.train("--size", "0"), lambda c: ("--size",)),
    Case("ckpt-every-0", lambda c: c.train("--ckpt-every", "0"), lambda c: ("--ckpt-every",)),
    Case("log-every-0", lambda c: c.train("--log-every", "0"), lambda c: ("--log-every",)),
    Case("lr-nan", lambda c: c.train("--lr", "nan"), lambda c: ("--lr", "finite")),
    Case("lr-negative", lambda c: c.train("--lr", "-1"), lambda c: ("--lr", "more than 0")),
    Case("out-is-a-file", lambda c: (c.tmp / "f.txt").write_text("mine") and
         ["train", "protonet", "--data", c.images, *TINY, "--out", c.tmp / "f.txt"],
         lambda c: ("--out", "f.txt")),
    Case("out-under-a-file", lambda c: (c.tmp / "f.txt").write_text("mine") and
         ["train", "protonet", "--data", c.images, *TINY, "--out", c.tmp / "f.txt" / "run"],
         lambda c: ("--out", "f.txt", "is a file")),
    Case("eval-episodes-0", lambda c: ["eval", c.image_run, "--episodes", "0"], lambda c: ("--episodes",)),
    Case("eval-queries-0", lambda c: ["eval", c.image_run, "--queries", "0"], lambda c: ("--queries",)),
    Case("eval-image-run-on-sine", lambda c: ["eval", c.image_run, "--data", "sine"],
         lambda c: ("--data sine", "task family")),
    Case("eval-sine-run-on-images", lambda c: ["eval", c.sine_run, "--data", c.images],
         lambda c: ("'sine'", "--data", str(c.images))),
    Case("checkpoint-preprocess-size", _damaged_preprocess, lambda c: ("preprocess.size", "best.pt")),
    Case("predict-out-folder", _predict_into_folder, lambda c: ("--out", str(c.tmp / "preds"))),
    Case("image-decompression-bomb", _bomb_image,
         lambda c: (str(c.tmp / "data" / "class_01" / "huge.png"), "decompression-bomb")),
    # -------------------------------------------------- were checked too late or not at all
    Case("test-ways-vs-4-test-classes", lambda c: c.train("--split", "fraction:0.5", "--test-ways", "5"),
         lambda c: ("--test-ways 5", "only 4 classes")),
    Case("default-test-ways-vs-4-test-classes",
         lambda c: ["train", "protonet", "--data", c.images, "--out", c.tmp / "out", "--size", "16",
                    "--ways", "3", "--episodes", "2", "--hidden", "8", "--split", "fraction:0.5", "--no-progress"],
         lambda c: ("--test-ways 5", "only 4 classes")),
    Case("val-ways-over-maml-head",
         lambda c: ["train", "maml", "--data", c.images, "--out", c.tmp / "out", "--size", "16", "--ways", "3",
                    "--val-ways", "5", "--episodes", "2", "--batch", "2", "--hidden", "8", "--no-progress"],
         lambda c: ("--val-ways 5", "3-way head")),
    Case("val-queries-too-many", lambda c: c.train("--val-every", "1", "--val-queries", "15"),
         lambda c: ("--val-queries 15", "images")),
    Case("zip-bomb-member", lambda c: c.train(data=c.bomb_zip),
         lambda c: ("refusing", "bomb.png", "209715200 bytes")),
    Case("split-none-eval-without-data", _split_none_run, lambda c: ("--split none", "--data")),
    Case("split-fraction-1", lambda c: c.train("--split", "fraction:1"), lambda c: ("fraction:1", "--split none")),
    Case("eval-pairs-negative", lambda c: ["eval", c.image_run, "--pairs", "-1"], lambda c: ("--pairs",)),
    Case("eval-finetune-steps-negative", lambda c: ["eval", c.image_run, "--finetune-steps", "-1"],
         lambda c: ("--finetune-steps", "-1")),
    Case("eval-finetune-lr-0", lambda c: ["eval", c.image_run, "--finetune-steps", "2", "--finetune-lr", "0"],
         lambda c: ("--finetune-lr", "--finetune-steps 2")),
    Case("eval-finetune-sine", lambda c: ["eval", c.sine_run, "--finetune-steps", "2"],
         lambda c: ("--finetune-steps", "sine")),
    Case("train-finetune-lr-0", lambda c: c.train("--finetune-steps", "2", "--finetune-lr", "0"),
         lambda c: ("--finetune-lr", "finetune_steps")),
    Case("optional-int-flag", lambda c: c.train("--val-ways", "many"), lambda c: ("--val-ways", "'many'")),
    # -------------------------------------------------- already worked: they must keep working
    Case("missing-data-path", lambda c: c.train(data=c.tmp / "nowhere"), lambda c: ("nowhere",)),
    Case("unreadable-image", _unreadable_image,
         lambda c: ("cannot read image", str(c.tmp / "data" / "class_02" / "img01.png"))),
    Case("empty-class-folder", _empty_class, lambda c: ("has no images", str(c.tmp / "data" / "class_09"))),
    Case("too-small-class", lambda c: c.train("--shots", "5", "--queries", "8"),
         lambda c: ("--shots 5", "has 10 images", "5 shots + 8 queries = 13")),
    Case("checkpoint-of-another-method", _other_method_checkpoint, lambda c: ("maml", "distance")),
    Case("unknown-method", lambda c: ["train", "nosuch", "--data", c.images], lambda c: ("'nosuch'",)),
    Case("unknown-option", lambda c: c.train("--bogus", "1"), lambda c: ("--bogus",)),
    Case("unknown-method-option", lambda c: c.train("-O", "depth=3"), lambda c: ("'depth'",)),
    Case("malicious-pickle-checkpoint", _malicious_checkpoint, lambda c: ("cannot load checkpoint", "best.pt")),
    # -------------------------------------------------- DEML's concept discriminator (fewshot.concept)
    Case("concept-weight-negative", lambda c: c.train("--concept-data", c.images, "--concept-weight", "-1"),
         lambda c: ("--concept-weight", "at least 0")),
    Case("concept-batch-0", lambda c: c.train("--concept-data", c.images, "--concept-batch", "0"),
         lambda c: ("--concept-batch", "at least 1")),
    Case("concept-data-missing", lambda c: c.train("--concept-data", c.tmp / "nowhere"),
         lambda c: ("--concept-data", str(c.tmp / "nowhere"))),
    Case("concept-data-one-class",
         lambda c: c.train("--concept-data", make_image_folder(c.tmp / "one", n_classes=1, per_class=4, size=16)),
         lambda c: ("--concept-data", "1 class")),
    Case("concept-classes-too-many", lambda c: c.train("--concept-data", c.images, "--concept-classes", "9"),
         lambda c: ("--concept-classes 9", "8 classes")),
    Case("concept-data-on-a-task-family",
         lambda c: ["train", "maml", "--data", "sine", "--out", c.tmp / "out", "--episodes", "2", "--batch", "2",
                    "--val-every", "0", "--no-eval", "--no-progress", "--concept-data", c.images],
         lambda c: ("--concept-data", "shape (1, 28, 28)", "(1,)")),
    Case("concept-data-method-without-embedding",
         lambda c: ["train", "contextual", "--data", c.images, "--out", c.tmp / "out", *TINY, "--concept-data",
                    c.images], lambda c: ("--concept-data", "contextual")),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """The inputs and runs the cases share (built once)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    images = make_image_folder(root / "images", n_classes=8, per_class=10, size=16)
    quiet = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        assert main([str(a) for a in ["train", "protonet", "--data", images, "--out", root / "image-run",
                                      *TINY]]) == 0, quiet.getvalue()
        assert main(["train", "maml", "--data", "sine", "--out", str(root / "sine-run"), "--episodes", "2",
                     "--batch", "2", "--val-every", "0", "--no-eval", "--no-progress"]) == 0, quiet.getvalue()
    bomb = write_omniglot_zip(root / "images_background_small1.zip", "images_background_small1")
    add_zero_member(bomb, "images_background_small1/Greek/character01/bomb.png", 200 << 20)
    return {"images": images, "image_run": root / "image-run", "sine_run": root / "sine-run", "bomb_zip": bomb}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared: dict, tmp_path: Path, capsys) -> None:
    ctx = Ctx(tmp=tmp_path, **shared)
    argv = case.make(ctx)
    capsys.readouterr()
    owned = [tmp_path, *shared.values()]
    before = snapshot(*owned)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fewshot: error: "), lines[0]
    print(f"{case.id}: {lines[0]}")
    for fragment in case.names(ctx):
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(*owned) == before, "a failed command changed the user's files"
    assert not (tmp_path / "pwned").exists()


def test_closed_pipe_exits_quietly() -> None:
    """``fewshot methods | head -1``, made deterministic: the reader is gone before anything is written.
    No BrokenPipeError traceback, nothing on stderr, and the status a SIGPIPE death reports (141)."""
    p = subprocess.Popen([sys.executable, "-m", "fewshot.cli", "methods", "-v"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


# ------------------------------------------------------------------------------------------ now accepted
def test_yaml_floats_follow_yaml_1_2(tmp_path: Path) -> None:
    """``lr: 1e-3`` (a string to YAML 1.1) is the number it means; quoted it stays a string and is refused."""
    p = tmp_path / "r.yaml"
    p.write_text("method: protonet\nlr: 1e-3\nmin_lr: 5E-7\ngamma: .5\nweight_decay: 1e+2\nways: 5\n")
    cfg = RunConfig.load(p)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.gamma, cfg.train.weight_decay) == (1e-3, 5e-7, 0.5, 100.0)
    assert isinstance(cfg.ways, int) and cfg.ways == 5
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"      # what plain PyYAML does
    # and what RunConfig.save writes reads back equal, strings that look like 1.2 numbers included
    odd = RunConfig(data="1e5", split="files:2e1,3e1")
    odd.save(tmp_path / "odd.yaml")
    assert RunConfig.load(tmp_path / "odd.yaml") == odd


def test_evaluate_refuses_no_episodes_or_queries(synthetic) -> None:
    from fewshot import methods
    from fewshot.episodes import EpisodeSampler
    from fewshot.evaluate import evaluate
    m = methods.build("protonet", synthetic.image_shape, backbone="mlp", mlp_hidden=[8], embedding=4)
    with pytest.raises(FewshotError, match="episodes must be at least 1"):
        evaluate(m, EpisodeSampler(synthetic, 3, 1, 2), 0, progress=False)
    with pytest.raises(FewshotError, match="at least 1 query"):
        evaluate(m, EpisodeSampler(synthetic, 3, 1, 0), 5, progress=False)


def test_python_api_gets_the_same_checks() -> None:
    """The checks live in RunConfig.check, driven by the dataclass annotations: the API sees them too."""
    for kw, fragment in [({"ways": "5"}, "ways must be an integer"), ({"queries": 0}, "queries must be at least 1"),
                         ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
                         ({"same_group": 1.5}, "same_group must be in [0, 1]"),
                         ({"size": [16, 0]}, "size must be"), ({"rotations": "yes"}, "rotations must be true"),
                         ({"options": {"hidden": 8.5}}, "hidden must be an integer")]:
        with pytest.raises(FewshotError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
            RunConfig(**kw).check()
    cfg = RunConfig(same_group=1, train=RunConfig().train)
    cfg.train.lr = 1
    cfg.check()
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.same_group, float)   # ints become floats


def test_16_bit_png_keeps_its_grey_levels(tmp_path: Path) -> None:
    """A real 16-bit grey PNG (a ramp over 0..65535) becomes 8-bit by v * 255 / 65535, not by clipping."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I;16")     # really stored as 16 bits
    x = load_image(tmp_path / "ramp.png", Preprocess(size=(64, 64)))[0].numpy()
    expected = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(x, expected)
    assert len(np.unique(x)) == 256
    rgb = load_image(tmp_path / "ramp.png", Preprocess(size=(64, 64), channels=3)).numpy()
    assert all(np.array_equal(rgb[i], expected) for i in range(3))


def test_queries_and_ways_are_derived_from_the_data(capsys, tmp_path: Path) -> None:
    """Folders of 10 images per class: ``--queries 5`` alone trains, validates and tests, with 9 queries
    (10 - 1 shot) chosen, said in one line and recorded in config.yaml."""
    data = make_image_folder(tmp_path / "att", n_classes=12, per_class=10, size=16)
    rc, out, err = run_cli(capsys, "train", "protonet", "--data", data, "--out", tmp_path / "run", "--size", "16",
                           "--ways", "3", "--shots", "5", "--queries", "5", "--episodes", "2", "--val-every", "2",
                           "--val-episodes", "5", "--test-episodes", "5", "--hidden", "8", "--split", "fraction:0.5",
                           "--val-fraction", "0.34", "--no-progress")
    assert rc == 0, err
    chosen = [l for l in err.splitlines() if l.startswith("fewshot: ") and "from the data" in l]
    assert len(chosen) == 1 and "validation 2-way 1-shot 9-query" in chosen[0] and \
        "test 5-way 1-shot 9-query" in chosen[0], err
    assert "5-way 1-shot 9-query" in out
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (cfg["val_ways"], cfg["val_queries"], cfg["test_ways"], cfg["test_queries"]) == (2, 9, 5, 9)
    # eval defaults to the run's recorded test settings
    rc, out, err = run_cli(capsys, "eval", tmp_path / "run", "--episodes", "5", "--no-progress")
    assert rc == 0 and "5-way 1-shot 9-query" in out, err


def test_maml_with_3_ways_validates_and_tests_3_way(capsys, tmp_path: Path, shared: dict) -> None:
    """A fixed-size head (maml's --outputs, default --ways) sets the default validation and test ways."""
    rc, out, err = run_cli(capsys, "train", "maml", "--data", shared["images"], "--out", tmp_path / "m",
                           "--size", "16", "--ways", "3", "--queries", "2", "--episodes", "2", "--batch", "2",
                           "--hidden", "8", "--val-every", "2", "--val-episodes", "5", "--test-episodes", "5",
                           "--split", "fraction:0.375", "--val-fraction", "0.4", "--no-progress")
    assert rc == 0, err
    assert "validation 2-way" in err and "test 3-way 1-shot 9-query" in err
    assert "3-way 1-shot 9-query" in out


def test_split_none_trains_on_every_class(capsys, tmp_path: Path, shared: dict) -> None:
    """--split none --val-fraction 0: every class trains, the final test is skipped with a message, and
    eval with --data works."""
    rc, out, err = run_cli(capsys, "train", "protonet", "--data", shared["images"], "--out", tmp_path / "r",
                           *TINY, "--split", "none", "--val-fraction", "0")
    assert rc == 0, err
    assert "no final test" in err and "--split none" in err and "test accuracy" not in out
    run = tmp_path / "r"
    assert len((run / "classes_train.txt").read_text().split()) == 8
    assert not (run / "classes_test.txt").exists() and not (run / "classes_val.txt").exists()
    rc, out, err = run_cli(capsys, "eval", run, "--data", shared["images"], "--ways", "3", "--episodes", "5",
                           "--no-progress")
    assert rc == 0 and "3-way 1-shot 9-query" in out, err


# ------------------------------------------------------------------------------------------ zip members
def test_zip_member_reads_are_bounded(tmp_path: Path) -> None:
    """A 200 MB all-zero member is refused from its declared size without being read (a few kB of memory);
    a member whose ratio is bomb-like is refused below the size limit; a member whose header understates its
    size is never read past what was declared; ordinary members read back exactly."""
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", b"hello " * 100)
    add_zero_member(z, "big.png", 200 << 20)
    add_zero_member(z, "dense.png", 8 << 20)
    zf = safezip.open_zip(z)
    assert safezip.read_member(zf, "ok.txt", z) == b"hello " * 100
    tracemalloc.start()
    try:
        with pytest.raises(FewshotError, match="big.png: it expands to 209715200 bytes"):
            safezip.read_member(zf, "big.png", z)
        with pytest.raises(FewshotError, match="dense.png: it expands [0-9]+-fold"):
            safezip.read_member(zf, "dense.png", z)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak

    # a header that lies: 8 MB of zeros declared as 1000 bytes (local and central headers patched)
    liar = tmp_path / "liar.zip"
    with zipfile.ZipFile(liar, "w", compression=zipfile.ZIP_DEFLATED) as w:
        w.writestr("x.png", bytes(8 << 20))
    raw = bytearray(liar.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.index(sig)
        assert struct.unpack_from("<I", raw, at + offset)[0] == 8 << 20
        struct.pack_into("<I", raw, at + offset, 1000)
    liar.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(FewshotError, match="cannot read .*x.png"):
            safezip.read_member(safezip.open_zip(liar), "x.png", liar)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
