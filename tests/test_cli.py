"""The command line: every command in-process (and the entry points in real subprocesses), and every bad
input giving exit status 2 with one line ``fewshot: error: ...`` on stderr and no traceback."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_image_folder, strokes, write_lake_zip
from fewshot import checkpoint
from fewshot.cli import main

#: Small settings shared by the training commands (images are resized to 28x28).
SMALL = ["--size", "28", "--ways", "5", "--shots", "1", "--queries", "2", "--split", "fraction:0.5",
         "--val-fraction", "0.25", "--val-ways", "3", "--val-queries", "2", "--val-episodes", "25",
         "--test-ways", "5", "--test-queries", "2", "--test-episodes", "25", "--hidden", "16", "--no-progress"]


def run_cli(capsys, *args) -> tuple:
    """(exit status, stdout, stderr) of ``fewshot ARGS`` run in-process."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:                 # argparse: --help, bad arguments
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err: str, *fragments: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fewshot: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def cli_roundtrip(capsys, run: Path, image_root: Path, method: str, *options, shots: int = 1,
                  query: tuple = (1, 3)) -> str:
    """Train ``method`` (with its ``options``) for 3 tiny 3-way episodes on the image-folder fixture through
    the CLI, then eval it 3-way 2-shot, predict the ``query`` = (class, file) image from a folder of
    ``shots`` labelled images per class, and plot; asserts each command works and returns plot's stdout."""
    from conftest import support_folder
    rc, out, err = run_cli(capsys, "train", method, "--data", image_root, "--size", "16", "--ways", "3",
                           "--shots", str(shots), "--queries", "2", "--episodes", "3", "--split", "fraction:0.5",
                           "--val-every", "0", *options, "--test-ways", "3", "--test-queries", "2",
                           "--test-episodes", "10", "--no-progress", "--out", run)
    assert rc == 0, err
    assert "test accuracy:" in out and "3-way 1-shot" in out
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--shots", "2", "--queries", "2", "--episodes", "10",
                           "--no-progress")
    assert rc == 0 and "3-way 2-shot" in out, err
    sup = run.parent / f"{run.name}-support"
    classes = support_folder(image_root, sup, shots=shots)
    rc, out, err = run_cli(capsys, "predict", run, "--support", sup,
                           "--query", sorted(classes[query[0]].iterdir())[query[1]], "--no-progress")
    assert rc == 0, err
    assert out.split("\t")[1] in {c.name for c in classes}
    rc, out, err = run_cli(capsys, "plot", run, "--classes", "4", "--no-progress")
    assert rc == 0, err
    assert (run / "plots" / "tsne_test_classes.png").stat().st_size > 5_000
    return out


@pytest.fixture(scope="module")
def trained(image_root: Path, tmp_path_factory) -> tuple:
    """One small run trained through the CLI on the image-folder fixture: (run dir, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["train", "protonet", "--data", str(image_root), "--episodes", "6", "--val-every", "3",
                   "--out", str(out), *SMALL])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


@pytest.fixture
def run_copy(trained, tmp_path: Path) -> Path:
    """A private copy of the trained run that a test may tamper with."""
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


# ------------------------------------------------------------------------------------------ commands
def test_methods(capsys) -> None:
    rc, out, _ = run_cli(capsys, "methods")
    assert rc == 0 and "Prototypical network" in out
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    for name in ("protonet", "maml", "fomaml", "anil", "boil", "metasgd", "reptile", "cavia", "adml", "taml"):
        assert name in listed
    rc, out, _ = run_cli(capsys, "methods", "--verbose")
    assert rc == 0 and "options:" in out and "distance=sqeuclidean" in out


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["predict"], ["plot"], ["methods"]])
def test_help(capsys, cmd: list) -> None:
    rc, out, err = run_cli(capsys, *cmd, "--help")
    assert rc == 0 and out.startswith("usage: fewshot") and not err
    if cmd == ["train"]:          # flags are described by their fields' comments, method options name owners
        flat = " ".join(out.split())
        assert "stop once this much training time has passed" in flat
        assert "sqeuclidean | euclidean | cosine | dot [hallucinate, protonet]; euclidean | cosine [siamese]" in flat


def test_version_and_no_command(capsys) -> None:
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == "fewshot 0.1.0"
    rc, out, _ = run_cli(capsys)
    assert rc == 2 and "usage: fewshot" in out


def test_train_writes_a_run(trained) -> None:
    out, stdout = trained
    assert "trained protonet for 6 steps" in stdout and "test accuracy:" in stdout and "±" in stdout
    for f in ("config.yaml", "metrics.csv", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt",
              "classes_train.txt", "classes_val.txt", "classes_test.txt"):
        assert (out / f).is_file(), f
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["ways"] == 5 and cfg["train"]["episodes"] == 6 and cfg["options"] == {"hidden": 16}
    assert cfg["precision"] in ("fp32", "bf16") and cfg["channels_last"] in (True, False)   # resolved
    ck = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ck["step"] == 6 and ck["in_shape"] == [1, 28, 28]
    assert ck["preprocess"] == {"size": [28, 28], "channels": 1, "invert": False}
    test = (out / "classes_test.txt").read_text().split()
    train = (out / "classes_train.txt").read_text().split()
    assert len(test) == 8 and not set(test) & set(train)
    assert list((out / "eval").glob("5w1s2q-seed0.*"))       # the final test evaluation was saved


def test_train_from_recipe_with_flag_override(capsys, image_root: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "protonet", "options": {"hidden": 8, "distance": "cosine"}, "data": str(image_root),
        "size": 28, "ways": 4, "shots": 1, "queries": 2, "split": "fraction:0.5", "val_fraction": 0.0,
        "episodes": 9, "lr": 0.002, "val_every": 0, "augment": {"affine": {"degrees": 5}}}))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "--config", recipe, "--episodes", "3", "--shots", "2",
                              "-O", "l2_penalty=0.01", "--out", out, "--no-progress", "--no-eval")
    assert rc == 0, err
    assert "trained protonet for 3 steps" in stdout and "test accuracy" not in stdout
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["episodes"] == 3 and cfg["shots"] == 2          # flags override the recipe
    assert cfg["ways"] == 4 and cfg["train"]["lr"] == 0.002              # the rest comes from the recipe
    assert cfg["augment"] == {"affine": {"degrees": 5}}
    assert cfg["options"] == {"hidden": 8, "distance": "cosine", "l2_penalty": 0.01}
    assert checkpoint.load(out / "checkpoints" / "last.pt")["method_config"]["distance"] == "cosine"


def test_train_and_resume(capsys, image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "protonet", "--data", image_root, "--out", out, "--val-every", "0", "--no-eval", *SMALL]
    rc, _, err = run_cli(capsys, *args, "--episodes", "2")
    assert rc == 0, err
    rc, stdout, err = run_cli(capsys, *args, "--episodes", "4", "--resume")
    assert rc == 0, err
    assert "trained protonet for 4 steps" in stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_resume_uses_the_runs_own_settings(capsys, image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--out", out, "--val-every", "0",
                         "--no-eval", *SMALL, "--episodes", "2", "--distance", "cosine")
    assert rc == 0, err
    before = yaml.safe_load((out / "config.yaml").read_text())
    # only the run directory and the new length: data, shapes and method options come from config.yaml
    rc, stdout, err = run_cli(capsys, "train", "--out", out, "--resume", "--episodes", "3", "--no-eval")
    assert rc == 0, err
    assert "trained protonet for 3 steps" in stdout
    after = yaml.safe_load((out / "config.yaml").read_text())
    assert after["options"] == before["options"] == {**before["options"], "distance": "cosine"}
    assert after["data"] == before["data"] and after["ways"] == before["ways"]
    assert after["train"]["episodes"] == 3


def test_train_on_glyphs(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "protonet", "--data", "glyphs", "--ways", "5", "--shots", "1",
                              "--queries", "1", "--episodes", "2", "--val-every", "0", "--hidden", "8",
                              "--test-queries", "2", "--test-episodes", "25", "--out", out, "--no-progress")
    assert rc == 0, err
    assert "trained protonet for 2 steps" in stdout and "test accuracy:" in stdout
    ck = checkpoint.load(out / "checkpoints" / "best.pt")
    assert ck["preprocess"] == {"size": [28, 28], "channels": 1, "invert": True}
    assert len((out / "classes_test.txt").read_text().split()) > 400          # 20% of ~3000 glyph classes


def test_eval(capsys, run_copy: Path) -> None:
    rc, out, err = run_cli(capsys, "eval", run_copy, "--ways", "3", "--shots", "1", "--queries", "2",
                           "--episodes", "30", "--seed", "5", "--no-progress")
    assert rc == 0, err
    assert "±" in out and "30 episodes" in out and "3-way 1-shot 2-query" in out and "seed 5" in out
    summary = json.loads((run_copy / "eval" / "3w1s2q-seed5.json").read_text())
    assert summary["n"] == 30 and summary["classes"] == 8 and summary["checkpoint_step"] in (3, 6)
    rows = list(csv.DictReader(open(run_copy / "eval" / "3w1s2q-seed5.csv")))
    assert len(rows) == 30
    # the same command gives the same numbers (fixed-seed episodes)
    rc, out2, _ = run_cli(capsys, "eval", run_copy, "--ways", "3", "--shots", "1", "--queries", "2",
                          "--episodes", "30", "--seed", "5", "--no-progress", "--checkpoint", "best")
    assert out2 == out
    rc, out3, err = run_cli(capsys, "eval", run_copy / "checkpoints" / "last.pt", "--ways", "3",
                            "--queries", "2", "--episodes", "25", "--no-progress")
    assert rc == 0, err


def test_eval_on_another_folder(capsys, run_copy: Path, fresh_image_root: Path) -> None:
    rc, out, err = run_cli(capsys, "eval", run_copy, "--data", fresh_image_root, "--ways", "5", "--queries", "2",
                           "--episodes", "25", "--no-progress")
    assert rc == 0, err
    assert "25 episodes" in out
    summary = json.loads((run_copy / "eval" / "5w1s2q-seed0-data.json").read_text())
    assert summary["classes"] == 6 and summary["data"] == str(fresh_image_root)


def test_eval_lake_runs(capsys, run_copy: Path, lake_zip: Path) -> None:
    rc, out, err = run_cli(capsys, "eval", run_copy, "--lake-runs", lake_zip, "--no-progress")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("run01: error") and lines[1].startswith("run02: error")
    # each query is the very image of its class: nearest prototype is exact
    assert "overall error rate: 0.00% over 8 test images (2 runs)" in out
    res = json.loads((run_copy / "eval" / "lake_runs.json").read_text())
    assert res["n"] == 8 and [r["run"] for r in res["runs"]] == ["run01", "run02"]


def test_predict(capsys, run_copy: Path, image_root: Path, tmp_path: Path) -> None:
    test_classes = (run_copy / "classes_test.txt").read_text().split()[:3]
    sup, qry = tmp_path / "support", tmp_path / "query"
    qry.mkdir()
    truth = {}
    for c in test_classes:
        (sup / c).mkdir(parents=True)
        shutil.copy(image_root / c / "img00.png", sup / c / "a.png")
        shutil.copy(image_root / c / "img00.png", qry / f"q_{c}.png")
        truth[str(qry / f"q_{c}.png")] = c
    rc, out, err = run_cli(capsys, "predict", run_copy, "--support", sup, "--query", qry, "--no-progress")
    assert rc == 0, err
    rows = [l.split("\t") for l in out.strip().splitlines()]
    assert len(rows) == 3
    for path, label, p in rows:
        assert truth[path] == label and 0 < float(p) <= 1
    assert "predictions.csv" in err
    written = list(csv.DictReader(open(run_copy / "predictions.csv")))
    assert [(r["query"], r["predicted"]) for r in written] == [(r[0], r[1]) for r in rows]
    # a single file as the query, and an explicit --out
    one = qry / f"q_{test_classes[1]}.png"
    rc, out, err = run_cli(capsys, "predict", run_copy, "--support", sup, "--query", one,
                           "--out", tmp_path / "p.csv", "--no-progress")
    assert rc == 0 and out.split("\t")[1] == test_classes[1]
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 1


def test_plot(capsys, run_copy: Path) -> None:
    rc, out, err = run_cli(capsys, "plot", run_copy, "--classes", "4", "--no-progress")
    assert rc == 0, err
    files = [Path(l) for l in out.strip().splitlines()]
    assert {f.name for f in files} == {"learning_curves.png", "tsne_test_classes.png"}
    for f in files:
        assert f.parent == run_copy / "plots" and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f.stat().st_size > 5000


# ------------------------------------------------------------------------------------------ entry points
def _subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_module_entry_point() -> None:
    p = _subprocess(sys.executable, "-m", "fewshot.cli", "methods")
    assert p.returncode == 0 and "protonet" in p.stdout.split(), p.stderr


def test_console_script(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "fewshot"
    if not exe.exists():
        exe = shutil.which("fewshot")
    assert exe, "the fewshot console script is not installed"
    p = _subprocess(exe, "--help")
    assert p.returncode == 0 and "train" in p.stdout and "predict" in p.stdout
    p = _subprocess(exe, "eval", tmp_path / "no-such-run")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"fewshot: error: no such run directory: {tmp_path / 'no-such-run'}"


def test_bad_option_in_a_real_process() -> None:
    p = _subprocess(sys.executable, "-m", "fewshot.cli", "train", "protonet", "--bogus", "1")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("fewshot: error: unrecognized arguments: --bogus")


# ------------------------------------------------------------------------------------------ bad inputs
def _train(capsys, data, tmp_path: Path, *extra) -> tuple:
    return run_cli(capsys, "train", "protonet", "--data", data, "--out", tmp_path / "out", "--episodes", "2",
                   *SMALL, *extra)


def test_missing_data_path(capsys, tmp_path: Path) -> None:
    rc, _, err = _train(capsys, tmp_path / "nowhere", tmp_path)
    assert_one_line_error(rc, err, "no such data set or path", "nowhere")


def test_data_is_a_plain_file(capsys, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    rc, _, err = _train(capsys, f, tmp_path)
    assert_one_line_error(rc, err, "is a file", "notes.txt")


def test_unreadable_image_is_named(capsys, fresh_image_root: Path, tmp_path: Path) -> None:
    bad = fresh_image_root / "class_02" / "img03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    rc, _, err = _train(capsys, fresh_image_root, tmp_path, "--split", "fraction:0.2")
    assert_one_line_error(rc, err, "cannot read image", str(bad))


def test_empty_class_folder(capsys, fresh_image_root: Path, tmp_path: Path) -> None:
    (fresh_image_root / "class_07").mkdir()
    rc, _, err = _train(capsys, fresh_image_root, tmp_path)
    assert_one_line_error(rc, err, "has no images", str(fresh_image_root / "class_07"))


def test_too_many_ways(capsys, fresh_image_root: Path, tmp_path: Path) -> None:
    rc, _, err = _train(capsys, fresh_image_root, tmp_path, "--split", "fraction:0.2", "--ways", "20")
    assert_one_line_error(rc, err, "asked for 20 ways", "only 4 classes")


def test_too_many_shots_names_the_class(capsys, fresh_image_root: Path, tmp_path: Path) -> None:
    rc, _, err = _train(capsys, fresh_image_root, tmp_path, "--split", "fraction:0.2", "--ways", "2",
                        "--shots", "5", "--queries", "3")
    line = assert_one_line_error(rc, err, "has 6 images", "5 shots + 3 queries = 8")
    assert "'class_0" in line


def test_too_many_eval_shots(capsys, run_copy: Path) -> None:
    rc, _, err = run_cli(capsys, "eval", run_copy, "--shots", "5", "--queries", "15", "--no-progress")
    assert_one_line_error(rc, err, "has 8 images", "5 shots + 15 queries = 20", "'class_")
    rc, _, err = run_cli(capsys, "eval", run_copy, "--ways", "9", "--no-progress")
    assert_one_line_error(rc, err, "asked for 9 ways", "only 8 classes")


def test_image_size_too_small_for_conv4(capsys, image_root: Path, tmp_path: Path) -> None:
    rc, _, err = _train(capsys, image_root, tmp_path, "--size", "8")
    assert_one_line_error(rc, err, "at least 16x16")


def test_eval_missing_run(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "eval", tmp_path / "gone")
    assert_one_line_error(rc, err, "no such run directory", "gone")
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "eval", tmp_path / "empty")
    assert_one_line_error(rc, err, "no checkpoint at", "best.pt")


def test_checkpoint_of_random_bytes(capsys, run_copy: Path) -> None:
    # arbitrary bytes make torch's unpickler fail in many ways (UnpicklingError, IndexError, KeyError,
    # UnicodeDecodeError, ...): every one must be the same one-line error
    samples = [b"", b"\x80\x02", b"PK\x03\x04garbage"] + [random.Random(s).randbytes(3000) for s in range(40)]
    for data in samples:
        (run_copy / "checkpoints" / "best.pt").write_bytes(data)
        rc, _, err = run_cli(capsys, "eval", run_copy)
        assert_one_line_error(rc, err, "cannot load checkpoint", "best.pt")


class Payload:
    """Unpickling this would create a file: a checkpoint holding it must be refused, not loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_arbitrary_object_is_refused(capsys, run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ck = torch.load(run_copy / "checkpoints" / "best.pt", weights_only=True)
    ck["extra"] = Payload(marker)
    torch.save(ck, run_copy / "checkpoints" / "best.pt")
    for cmd in (["eval", run_copy], ["plot", run_copy], ["eval", run_copy / "checkpoints" / "best.pt"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert_one_line_error(rc, err, "cannot load checkpoint")
    assert not marker.exists()
    torch.load(run_copy / "checkpoints" / "best.pt", weights_only=False)    # what a trusting load would do
    assert marker.exists()


def test_plain_tensor_file_is_not_a_checkpoint(capsys, run_copy: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, run_copy / "checkpoints" / "best.pt")
    rc, _, err = run_cli(capsys, "eval", run_copy)
    assert_one_line_error(rc, err, "is not a fewshot checkpoint")


@pytest.mark.parametrize("change, fragment", [
    ({"method": "nosuchmethod"}, "unknown method 'nosuchmethod'"),
    ({"method": "maml"}, "method 'maml' has no option 'distance'"),
    ({"in_shape": [3, 28, 28]}, "does not fit a protonet model of input shape (3, 28, 28)"),
    ({"in_shape": [784]}, "does not fit a protonet model of input shape (784,)"),
    ({"method_config": {"hidden": 32}}, "does not fit a protonet model"),
    ({"method_config": {"hidden": 16, "depth": 9}}, "has no option 'depth'"),
    ({"model": None}, "missing 'model'"),
])
def test_checkpoint_of_another_method_or_shape(capsys, run_copy: Path, change: dict, fragment: str) -> None:
    path = run_copy / "checkpoints" / "best.pt"
    ck = torch.load(path, weights_only=True)
    for k, v in change.items():
        if v is None:
            del ck[k]
        else:
            ck[k] = v
    torch.save(ck, path)
    rc, _, err = run_cli(capsys, "eval", run_copy, "--episodes", "25", "--no-progress")
    assert_one_line_error(rc, err, fragment)


def test_resume_with_nothing_to_resume(capsys, image_root: Path, tmp_path: Path) -> None:
    rc, _, err = _train(capsys, image_root, tmp_path, "--resume")
    assert_one_line_error(rc, err, "nothing to resume")


def test_resume_needs_the_run_directory(capsys) -> None:
    rc, _, err = run_cli(capsys, "train", "--resume")
    assert_one_line_error(rc, err, "--resume needs --out")


def test_train_over_an_existing_run(capsys, run_copy: Path, image_root: Path) -> None:
    rc, _, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--out", run_copy, *SMALL)
    assert_one_line_error(rc, err, "already holds a run", "--resume")


@pytest.mark.parametrize("args, fragment", [
    (["train", "nosuchmethod"], "unknown method 'nosuchmethod'"),
    (["train", "protonet", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "protonet", "--ways", "many"], "invalid int value: 'many'"),
    (["train", "protonet", "-O", "depth=3"], "has no option 'depth'"),
    (["train", "protonet", "-O", "depth"], "KEY=VALUE"),
    (["train", "protonet", "--hidden", "wide"], "bad value 'wide' for option hidden"),
    (["train"], "name a method"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["eval"], "the following arguments are required: run"),
    (["predict", "somewhere"], "the following arguments are required: --support"),
])
def test_bad_arguments(capsys, args: list, fragment: str) -> None:
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--distance", "manhattan"], "unknown distance 'manhattan'"),
    (["--split", "group:Klingon"], "no groups"),
    (["--split", "thirds"], "unknown split 'thirds'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--channels", "2"], "channels must be 1 or 3"),
])
def test_bad_settings(capsys, image_root: Path, tmp_path: Path, extra: list, fragment: str) -> None:
    if extra[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc, _, err = _train(capsys, image_root, tmp_path, *extra)
    assert_one_line_error(rc, err, fragment)


def test_missing_config_file(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "nope.yaml")
    assert_one_line_error(rc, err, "no such config file")


def test_bad_lake_runs(capsys, run_copy: Path, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "eval", run_copy, "--lake-runs", tmp_path / "missing.zip")
    assert_one_line_error(rc, err, "no such file or folder")
    z, _ = write_lake_zip(tmp_path / "all_runs.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("run01/../../escape.png", b"x")
    rc, _, err = run_cli(capsys, "eval", run_copy, "--lake-runs", z)
    assert_one_line_error(rc, err, "refusing unsafe path", "escape.png")


def test_bad_predict_inputs(capsys, run_copy: Path, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "predict", run_copy, "--support", tmp_path / "nosup", "--query", tmp_path)
    assert_one_line_error(rc, err, "no such folder", "nosup")
    sup = make_image_folder(tmp_path / "sup", n_classes=2, per_class=1)
    (tmp_path / "noimages").mkdir()
    rc, _, err = run_cli(capsys, "predict", run_copy, "--support", sup, "--query", tmp_path / "noimages")
    assert_one_line_error(rc, err, "no images in folder", "noimages")
    bad = tmp_path / "q.png"
    bad.write_bytes(b"junk")
    rc, _, err = run_cli(capsys, "predict", run_copy, "--support", sup, "--query", bad)
    assert_one_line_error(rc, err, "cannot read image", str(bad))
    strokes(1, 32).save(tmp_path / "ok.png")
    rc, _, err = run_cli(capsys, "predict", run_copy, "--support", sup, "--query", tmp_path / "ok.png",
                         tmp_path / "missing.png")
    assert_one_line_error(rc, err, "no such file or folder", "missing.png")
