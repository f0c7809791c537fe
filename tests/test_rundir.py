"""Run folders: the lock, the overwrite rule, exact stops (Ctrl-C at any moment, SIGKILL), resume after a torn
metrics line or leftover temporary files, refusal of changed settings on resume, the exploding-loss warning."""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_synthetic
from fewshot import checkpoint, rundir
from fewshot.cli import main
from fewshot.config import RunConfig
from fewshot.errors import FewshotError
from fewshot.precision import resolve_channels_last, resolve_device, resolve_precision
from fewshot.run import fit
from fewshot.train import TrainConfig, TrainingInterrupted

train_mod = importlib.import_module("fewshot.train")     # the module (``fewshot.train`` is also the function)

#: the CLI's small settings on the image-folder fixture (16 classes of 8 images)
SMALL = ["--size", "28", "--ways", "5", "--shots", "1", "--queries", "2", "--split", "fraction:0.5",
         "--val-fraction", "0.25", "--val-ways", "2", "--val-queries", "2", "--val-episodes", "10",
         "--test-ways", "3", "--test-queries", "2", "--hidden", "8", "--no-progress", "--no-eval"]


@pytest.fixture(autouse=True)
def default_sigint():
    """Ctrl-C as in a terminal, whatever started pytest: a shell's background job (``cmd &``) inherits SIGINT
    ignored, and then neither the trainer's stop handler nor a training subprocess would see the signal (the
    trainer, rightly, leaves an ignored SIGINT alone). A Python-level handler in this process also gives the
    subprocesses SIGINT's default disposition."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def ds16():
    """12 classes x 10 images of 1x16x16."""
    return make_synthetic(n_classes=12, per_class=10, size=16, seed=2)


def _cfg(steps: int = 12, **train_kw) -> RunConfig:
    tc = dict(episodes=steps, val_every=4, val_episodes=10, ckpt_every=100, log_every=1, lr=1e-3)
    tc.update(train_kw)
    return RunConfig(method="protonet", options={"hidden": 8}, data="(in memory)", split="fraction:0.25",
                     val_fraction=0.25, augment={"affine": {"degrees": 15, "translate": 0.1}},
                     ways=3, shots=1, queries=2, batch=2, val_ways=2, val_shots=1, val_queries=2,
                     test_ways=3, test_queries=2, device="cpu", precision="fp32", channels_last=False, seed=3,
                     train=TrainConfig(**tc))


def _same_weights(a: Path, b: Path) -> None:
    ca, cb = checkpoint.load(a / "checkpoints" / "last.pt"), checkpoint.load(b / "checkpoints" / "last.pt")
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(ca["sampler"]["generator"], cb["sampler"]["generator"])


def _rows(run: Path) -> list:
    return [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
            for l in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(capsys, *args) -> tuple:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err: str, *fragments: str) -> str:
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("fewshot: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _spawn(args: list, cwd: Path) -> subprocess.Popen:
    """``python -m fewshot.cli ARGS`` as a real process (one thread, so its arithmetic matches this process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "fewshot.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(proc: subprocess.Popen, run: Path, rows: int, timeout: float = 120.0) -> None:
    """Wait until the training process has logged ``rows`` metric rows."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        f = run / "metrics.jsonl"
        if f.is_file() and f.read_text().count("\n") >= rows:
            return
        time.sleep(0.02)
    raise AssertionError("training did not start")


# ------------------------------------------------------------------------------------------ the lock
def test_a_live_run_is_locked_and_the_lock_dies_with_it(capsys, image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _spawn(["train", "protonet", "--data", image_root, "--out", out, "--episodes", "100000",
                   "--val-every", "0", "--log-every", "1", "--ckpt-every", "5", *SMALL], tmp_path)
    try:
        _wait_rows(proc, out, 6)
        holder = f"pid {proc.pid} on "
        args = ["train", "protonet", "--data", image_root, "--out", out, "--episodes", "2", *SMALL]
        rc, _, err = run_cli(capsys, *args)
        one_line_error(rc, err, "is in use by another run", holder, "since", "--episodes 100000")
        rc, _, err = run_cli(capsys, *args, "--overwrite")                 # cannot remove a live run
        one_line_error(rc, err, "is in use by another run", holder)
        rc, _, err = run_cli(capsys, *args, "--resume")
        one_line_error(rc, err, "is in use by another run", holder)
        assert (out / "checkpoints" / "last.pt").is_file() and (out / "metrics.jsonl").is_file()
    finally:
        proc.kill()                                                          # SIGKILL: no chance to clean up
        proc.communicate()
    fd = os.open(out / rundir.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)                     # the kernel dropped the lock
    finally:
        os.close(fd)
    rc, stdout, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--out", out, "--episodes", "2",
                              "--overwrite", *SMALL)
    assert rc == 0, err
    assert "trained protonet for 2 steps" in stdout
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 2


def test_the_python_api_is_locked_too(ds16, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with rundir.RunFolder(out) as held:
        held.create(_cfg(2))
        with pytest.raises(FewshotError, match=f"in use by another run \\(pid {os.getpid()} "):
            fit(_cfg(2), out, progress=False, dataset=ds16)
    fit(_cfg(2), out, progress=False, dataset=ds16)            # released on exit
    fit(_cfg(4), out, resume=True, progress=False, dataset=ds16)  # and after every fit


# ------------------------------------------------------------------------------------------ overwrite
def test_overwrite_replaces_only_what_fewshot_wrote(capsys, image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "protonet", "--data", image_root, "--out", out, "--episodes", "2", *SMALL]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "eval", out, "--ways", "3", "--queries", "2", "--episodes", "5", "--no-progress")
    assert rc == 0, err
    evals = sorted(p.name for p in (out / "eval").iterdir())
    assert evals == ["3w1s2q-seed0.csv", "3w1s2q-seed0.json"]
    listed = rundir.written_files(out)
    assert {"config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
            "eval/3w1s2q-seed0.json", "eval/3w1s2q-seed0.csv"} <= set(listed)
    # the user's own files inside the run folder, and a leftover temporary checkpoint of a killed run
    (out / "src").mkdir()
    (out / "src" / "train.py").write_text("code")
    (out / "notes.txt").write_text("mine")
    (out / "eval" / "mine.csv").write_text("a,b")
    (out / "checkpoints" / "keep.pt").write_text("mine too")
    (out / "checkpoints" / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")
    rc, _, err = run_cli(capsys, *args)
    one_line_error(rc, err, "already holds a run", "--resume", "--overwrite")
    rc, _, err = run_cli(capsys, *args[:-len(SMALL)], "--episodes", "3", "--overwrite", *SMALL)
    assert rc == 0, err
    assert (out / "src" / "train.py").read_text() == "code" and (out / "notes.txt").read_text() == "mine"
    assert (out / "eval" / "mine.csv").read_text() == "a,b"
    assert (out / "checkpoints" / "keep.pt").read_text() == "mine too"
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["mine.csv"]   # the old results are gone
    assert not (out / "checkpoints" / ".last.pt.tmp4242").exists()
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 3
    assert [r["step"] for r in _rows(out) if r["kind"] == "train"] == [3]       # a fresh metrics file


def test_overwrite_refuses_a_folder_fewshot_did_not_create(capsys, image_root: Path, tmp_path: Path) -> None:
    """The issue's case: `--overwrite` of a folder that merely holds checkpoints/last.pt deleted it whole."""
    p = tmp_path / "p"
    (p / "checkpoints").mkdir(parents=True)
    (p / "src").mkdir()
    (p / "checkpoints" / "last.pt").write_text("x\n")
    (p / "src" / "train.py").write_text("code\n")
    for extra in (["--overwrite"], []):
        rc, _, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--episodes", "2", "--out", p,
                             *extra, *SMALL)
        one_line_error(rc, err, str(p), "checkpoints/last.pt", "not a fewshot run folder", "--out")
    assert (p / "src" / "train.py").read_text() == "code\n"
    assert (p / "checkpoints" / "last.pt").read_text() == "x\n"
    assert sorted(q.name for q in p.rglob("*")) == ["checkpoints", "last.pt", "src", "train.py"]
    # a folder holding none of the names a run writes takes a run beside its files
    q = tmp_path / "q"
    (q / "data").mkdir(parents=True)
    (q / "data" / "x.txt").write_text("x")
    rc, _, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--episodes", "2", "--out", q, *SMALL)
    assert rc == 0, err
    assert (q / "data" / "x.txt").read_text() == "x" and rundir.is_marked(q)


def test_a_run_folder_of_an_earlier_version_is_recognised(capsys, image_root: Path, tmp_path: Path) -> None:
    """No manifest, but a checkpoints/last.pt that loads as a run checkpoint: its known files are replaced,
    nothing else; resuming it adopts the files."""
    out = tmp_path / "old"
    args = ["train", "protonet", "--data", image_root, "--out", out, *SMALL]
    rc, _, err = run_cli(capsys, *args, "--episodes", "2")
    assert rc == 0, err
    (out / rundir.MARKER).unlink()
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "mine.json").write_text('{"a": 1}')
    rc, _, err = run_cli(capsys, *args, "--episodes", "3", "--resume")
    assert rc == 0, err
    assert set(rundir.written_files(out)) >= {"config.yaml", "checkpoints/last.pt", "metrics.jsonl"}
    (out / rundir.MARKER).unlink()
    rc, _, err = run_cli(capsys, *args, "--episodes", "2", "--overwrite")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "mine.json").read_text() == '{"a": 1}'
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 2 and rundir.is_marked(out)


def test_out_that_is_a_file_or_cannot_be_written(capsys, image_root: Path, tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("keep")
    for out, fragment in [(f, "is a file"), (f / "run", "is a file"), (Path("/proc/fewshot-run"), "cannot write")]:
        rc, _, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--out", out, "--episodes", "2",
                             *SMALL)
        one_line_error(rc, err, f"--out {out}", fragment)
        rc, _, err = run_cli(capsys, "train", "--out", out, "--resume")
        one_line_error(rc, err, f"--out {out}", fragment)
    assert f.read_text() == "keep"
    with pytest.raises(FewshotError, match="is a file"):
        fit(_cfg(2), f)


# ------------------------------------------------------------------------------------------ exact stops
def test_ctrl_c_of_a_real_training_process_resumes_bit_identically(capsys, image_root: Path,
                                                                   tmp_path: Path) -> None:
    """SIGINT to a training subprocess mid-run: it finishes the step, saves it, exits 130 with the message;
    --resume then ends with exactly the weights, optimiser state and metric rows of an uninterrupted run."""
    args = ["train", "protonet", "--data", image_root, "--episodes", "60", "--val-every", "5",
            "--log-every", "1", "--ckpt-every", "1000", *SMALL]
    part, full = tmp_path / "part", tmp_path / "full"
    proc = _spawn([*args, "--out", part], tmp_path)
    _wait_rows(proc, part, 8)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    msg = err.strip().splitlines()[-1]
    assert msg.startswith("fewshot: interrupted (training state saved to ") and "continue with --resume" in msg
    stopped = checkpoint.load(part / "checkpoints" / "last.pt")["step"]
    assert 8 <= stopped < 60 and f"at step {stopped};" in msg
    assert max(r["step"] for r in _rows(part)) == stopped                  # no row past the saved step
    for cmd in ([*args, "--out", part, "--resume"], [*args, "--out", full]):     # here: one thread as well
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 0, err
    _same_weights(part, full)
    assert _rows(part) == _rows(full)


def _interrupt_on(monkeypatch, where: str, call: int, times: int = 1) -> None:
    """Send this process SIGINT ``times`` times as the ``call``-th call of one part of a training step starts."""
    from fewshot.episodes import EpisodeSampler
    from fewshot.methods.protonet import ProtoNet
    owner, name = {"sampling": (EpisodeSampler, "sample"), "forward": (ProtoNet, "loss"),
                   "backward": (torch.Tensor, "backward"), "optimiser step": (torch.optim.Adam, "step"),
                   "validation": (train_mod, "evaluate"), "checkpoint": (checkpoint, "save")}[where]
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapper(*a, **kw):
        count["n"] += 1
        if count["n"] == call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)        # Python runs the handler right here
        return original(*a, **kw)
    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    fit(_cfg(ckpt_every=4), out, progress=False, dataset=make_synthetic(n_classes=12, per_class=10, size=16,
                                                                        seed=2))
    return out


@pytest.mark.parametrize("where, call", [("sampling", 6), ("forward", 3), ("backward", 7), ("optimiser step", 5),
                                         ("validation", 2), ("checkpoint", 2)])
def test_ctrl_c_at_any_moment_is_exact(monkeypatch, ds16, tmp_path: Path, uninterrupted: Path, where: str,
                                       call: int) -> None:
    """A first Ctrl-C inside any part of a step lets that step finish, saves it, and the resumed run equals
    the uninterrupted one bit for bit."""
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _interrupt_on(mp, where, call)
        with pytest.raises(TrainingInterrupted) as info:
            fit(_cfg(ckpt_every=4), out, progress=False, dataset=ds16)
    assert info.value.saved
    saved = checkpoint.load(out / "checkpoints" / "last.pt")
    assert saved["step"] == info.value.step and 1 <= saved["step"] < 12
    assert max(r["step"] for r in _rows(out)) == saved["step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # the handler is put back
    fit(_cfg(ckpt_every=4), out, resume=True, progress=False, dataset=ds16)
    _same_weights(out, uninterrupted)
    assert _rows(out) == _rows(uninterrupted)


def test_ctrl_c_in_the_last_step_completes_the_run(monkeypatch, capsys, ds16, tmp_path: Path,
                                                   uninterrupted: Path) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _interrupt_on(mp, "optimiser step", 12)
        run = fit(_cfg(ckpt_every=4), out, progress=False, dataset=ds16)      # no TrainingInterrupted
    assert run.train_result.steps == 12
    assert "step 12: training ended with the step that Ctrl-C let finish" in capsys.readouterr().out
    _same_weights(out, uninterrupted)


def test_second_ctrl_c_stops_at_once_and_saves_nothing(monkeypatch, ds16, tmp_path: Path,
                                                       uninterrupted: Path) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _interrupt_on(mp, "optimiser step", 6, times=2)     # mid-update of step 6: last.pt is step 4's
        with pytest.raises(TrainingInterrupted) as info:
            fit(_cfg(ckpt_every=4), out, progress=False, dataset=ds16)
    assert not info.value.saved and info.value.step == 4
    assert "nothing saved" in str(info.value) and "step 4" in str(info.value)
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 4
    fit(_cfg(ckpt_every=4), out, resume=True, progress=False, dataset=ds16)
    _same_weights(out, uninterrupted)
    assert _rows(out) == _rows(uninterrupted)


def test_resume_after_a_torn_metrics_line_and_leftover_temp_files(ds16, tmp_path: Path,
                                                                   uninterrupted: Path) -> None:
    """What a SIGKILL can leave: half a metrics row (resume died with JSONDecodeError) and the temporary
    files of a checkpoint write; the resumed run is still exact."""
    part = tmp_path / "part"

    def stop(step: int) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        fit(_cfg(ckpt_every=4), part, progress=False, dataset=ds16, on_step=stop)
    assert checkpoint.load(part / "checkpoints" / "last.pt")["step"] == 6
    with open(part / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "kind": "train", "lo')           # killed while appending step 7's row
    (part / "checkpoints" / ".last.pt.tmp99999").write_bytes(b"\x80\x02partial")   # ... or writing last.pt
    (part / "checkpoints" / ".best.pt.tmp99999").write_bytes(b"")
    fit(_cfg(ckpt_every=4), part, resume=True, progress=False, dataset=ds16)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    _same_weights(part, uninterrupted)
    assert _rows(part) == _rows(uninterrupted)


# ------------------------------------------------------------------------------------------ settings on resume
def test_resume_refuses_changed_settings_and_names_them(capsys, image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--out", out, "--episodes", "2",
                         "--val-every", "0", *SMALL)
    assert rc == 0, err
    before = (out / "config.yaml").read_text()
    rc, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--ways", "4", "--shots", "2", "--lr", "0.01",
                         "--episodes", "4")
    one_line_error(rc, err, "ways: 5 -> 4", "shots: 1 -> 2", "lr: 0.001 -> 0.01", "--episodes")
    other = Path(shutil.copytree(image_root, tmp_path / "copy"))
    rc, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--data", other)
    one_line_error(rc, err, f"data: '{image_root}' -> '{other}'")
    rc, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--episodes", "1")
    one_line_error(rc, err, "episodes: 2 -> 1")
    assert (out / "config.yaml").read_text() == before
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 2
    # the same settings given again, written another way, and a longer run are accepted
    rc, stdout, err = run_cli(capsys, "train", "protonet", "--data", f"{image_root}/", "--out", out, "--resume",
                              "--episodes", "3", "--time-limit-s", "0", "--val-every", "0", *SMALL)
    assert rc == 0, err
    assert "trained protonet for 3 steps" in stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["episodes"] == 3


def test_resume_in_python_compares_resolved_values(ds16, tmp_path: Path) -> None:
    out = tmp_path / "run"
    auto = _cfg(4)
    auto.precision, auto.channels_last, auto.device = "auto", "auto", "auto"
    fit(auto, out, progress=False, dataset=ds16)
    dev = resolve_device("auto")
    same = _cfg(6)                                   # "auto" written out as what it resolved to here
    same.precision, same.channels_last = resolve_precision("auto", dev), resolve_channels_last("auto", dev)
    same.device = str(dev)
    fit(same, out, resume=True, progress=False, dataset=ds16)
    changed = _cfg(8, lr=0.01)
    changed.ways, changed.data, changed.options = 2, "elsewhere", {"hidden": 8, "distance": "cosine"}
    with pytest.raises(FewshotError) as info:
        fit(changed, out, resume=True, progress=False, dataset=ds16)
    msg = str(info.value)
    for fragment in ("data: '(in memory)' -> 'elsewhere'", "ways: 3 -> 2", "lr: 0.001 -> 0.01",
                     "options.distance: "):
        assert fragment in msg, (fragment, msg)
    assert "\n" not in msg
    # the low-level loop refuses a changed TrainConfig as well
    from fewshot import methods
    from fewshot.episodes import EpisodeSampler
    m = methods.build("protonet", ds16.image_shape, hidden=8)
    with pytest.raises(FewshotError, match="lr: 0.001 -> 0.01"):
        train_mod.train(m, EpisodeSampler(ds16, 3, 1, 2), TrainConfig(episodes=9, lr=0.01), out, resume=True,
                        progress=False)


def test_resume_refuses_another_device_and_overwrite_with_resume(ds16, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(_cfg(2), out, progress=False, dataset=ds16)
    with pytest.raises(FewshotError, match="--resume continues .* --overwrite replaces it; pass one"):
        fit(_cfg(4), out, resume=True, overwrite=True, progress=False, dataset=ds16)
    last = out / "checkpoints" / "last.pt"
    ck = checkpoint.load(last)
    assert ck["device"] == "cpu"
    ck["device"] = "cuda:0"                        # as if trained on a GPU with device "auto"
    checkpoint.save(ck, last)
    with pytest.raises(FewshotError, match="was trained on cuda:0; resuming it on cpu would not continue it"):
        fit(_cfg(4), out, resume=True, progress=False, dataset=ds16)


# ------------------------------------------------------------------------------------------ exploding loss
def test_an_exploding_loss_is_warned_about_once(capsys, ds16, tmp_path: Path) -> None:
    fit(_cfg(10, lr=1e6, val_every=0), tmp_path / "hot", progress=False, dataset=ds16)
    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1, out
    assert "training loss" in warnings[0] and "starting level" in warnings[0] and "lower --lr" in warnings[0]
    assert warnings[0].startswith("warning: step ")
    fit(_cfg(10, val_every=0), tmp_path / "calm", progress=False, dataset=ds16)
    assert "warning:" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ task workers
def test_task_workers_ignore_sigint() -> None:
    """The terminal's Ctrl-C is for the parent, which finishes its step with the workers' help: a task worker
    runs in a session of its own (the terminal's SIGINT does not reach it) and ignores a SIGINT sent to it."""
    from fewshot import methods
    from fewshot.parallel import TaskPool
    pool = TaskPool(methods.build("maml", (1, 16, 16), outputs=2, hidden=4), 1)
    try:
        pid = pool.procs[0].pid
        assert os.getsid(pid) != os.getsid(0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:            # until the worker's loop runs (SIGINT in its ignored mask)
            mask = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("SigIgn"))
            if int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker never ignored SIGINT")
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        assert pool.procs[0].poll() is None
    finally:
        pool.close()
