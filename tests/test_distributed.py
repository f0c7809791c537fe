"""Distributed training and evaluation (fewshot.distributed): 2 gloo ranks on this machine against one process.

The ranks are started the way a user starts them, ``fewshot train ... --nproc 2`` (torch.distributed.run); the
one-process references run in the test process. The runs use plain SGD: Adam divides each gradient by its
own running scale, so a gradient that is zero in exact arithmetic (a convolution's bias before batch norm)
turns float summation noise -- which any change of reduction order makes, threads as much as ranks -- into
full-size steps, and the weights stop being comparable to a tolerance. And in fp32: under bf16 autocast the
gradient-based family's meta-gradient combination rounds to bf16 (in one process as well), which a
different split of the tasks rounds differently.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewshot import cli, distributed
from fewshot.errors import FewshotError

from conftest import make_image_folder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 60      # $FEWSHOT_DIST_TIMEOUT of the launched runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 classes x 6 images of 16x16: 2-way 1-shot 2-query tasks."""
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", n_classes=10, per_class=6, size=16)


def train_args(method: str, data: Path, out: Path, episodes: int = 20, *extra: str) -> list:
    return ["train", method, "--data", str(data), "--size", "16", "--ways", "2", "--shots", "1", "--queries", "2",
            "--batch", "2", "--episodes", str(episodes), "--hidden", "8", "--val-every", "0", "--optimizer", "sgd",
            "--lr", "0.05", "--precision", "fp32", "--no-progress", "--no-eval", "--out", str(out), *extra]


def launch(args: list, **kw) -> subprocess.CompletedProcess:
    """``python -m fewshot ARGS`` in a child process (``--nproc`` in ARGS starts the ranks)."""
    env = dict(os.environ, FEWSHOT_DIST_TIMEOUT=str(TIMEOUT_S))
    return subprocess.run([sys.executable, "-m", "fewshot", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def here(capsys, args: list) -> tuple:
    """The CLI in this process (one rank): (status, stdout, stderr)."""
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def assert_same_state(a: dict, b: dict, atol: float = 2e-5) -> None:
    """Same step, sampler state, weights and buffers (floats to a tolerance, counters exactly)."""
    assert a["step"] == b["step"]
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    assert a["model"].keys() == b["model"].keys()
    for k, x in a["model"].items():
        y = b["model"][k]
        if x.is_floating_point():
            assert torch.allclose(x, y, atol=atol, rtol=1e-4), f"{k}: max diff {float((x - y).abs().max()):.3g}"
        else:
            assert torch.equal(x, y), k


@pytest.fixture(scope="module")
def protonet_runs(data, tmp_path_factory) -> tuple:
    """The same 20-step protonet run on 2 ranks (launched) and in one process; batch norm per task
    (--task-group 1), so both normalise each task on its own."""
    root = tmp_path_factory.mktemp("protonet")
    two = root / "two"
    res = launch(train_args("protonet", data, two, 20, "--task-group", "1") + ["--nproc", "2"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("trained protonet for 20 steps") == 1      # rank 0 alone prints
    one = root / "one"
    assert cli.main([str(a) for a in train_args("protonet", data, one, 20, "--task-group", "1")]) == 0
    return one, two


def test_protonet_two_ranks_train_like_one(protonet_runs) -> None:
    one, two = protonet_runs
    a, b = last(one), last(two)
    assert_same_state(a, b)
    # the logged losses are the global batch's, not rank 0's share
    import json
    rows = [[json.loads(l)["loss"] for l in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    assert rows[0] == pytest.approx(rows[1], abs=1e-4)
    # rank 0 alone wrote the folder: one lock holder, one manifest, no temporary files left
    assert not list(two.rglob("*.tmp*"))


def test_two_rank_checkpoint_resumes_on_one(protonet_runs, data, tmp_path, capsys) -> None:
    """A checkpoint of 2 ranks continued by one process ends where one process alone ends."""
    _, two = protonet_runs
    moved = tmp_path / "two"
    shutil.copytree(two, moved)
    rc, _, err = here(capsys, train_args("protonet", data, moved, 30, "--task-group", "1") + ["--resume"])
    assert rc == 0, err
    ref = tmp_path / "ref"
    rc, _, err = here(capsys, train_args("protonet", data, ref, 30, "--task-group", "1"))
    assert rc == 0, err
    assert_same_state(last(moved), last(ref))


def test_maml_two_ranks_train_like_one(data, tmp_path, capsys) -> None:
    """Second-order MAML meta-gradients averaged over 2 ranks = the one-process meta-gradient (each task
    normalises its own batch statistics, so no task groups are needed)."""
    two = tmp_path / "two"
    res = launch(train_args("maml", data, two) + ["--nproc", "2"])
    assert res.returncode == 0, res.stderr
    rc, _, err = here(capsys, train_args("maml", data, tmp_path / "one"))
    assert rc == 0, err
    assert_same_state(last(tmp_path / "one"), last(two))


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the child of ``launcher`` that torchrun started as ``rank``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} under pid {launcher}")


LONG = 200      # steps of the runs that are stopped part-way


def long_args(data: Path, out: Path) -> list:
    return train_args("protonet", data, out, LONG, "--ckpt-every", "10", "--task-group", "1")


@pytest.fixture(scope="module")
def long_reference(data, tmp_path_factory) -> dict:
    """The uninterrupted one-process run the stopped runs must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main([str(a) for a in long_args(data, out)]) == 0
    return last(out)


def start_ranks(args: list) -> subprocess.Popen:
    env = dict(os.environ, FEWSHOT_DIST_TIMEOUT=str(TIMEOUT_S))
    return subprocess.Popen([sys.executable, "-m", "fewshot", *map(str, args), "--nproc", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, path: Path) -> None:
    """Until ``path`` appears (the first checkpoint, at step 10 of LONG: the run goes on long after)."""
    deadline = time.monotonic() + 240
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_killed_rank_stops_the_run_and_it_resumes_exactly(data, tmp_path, long_reference) -> None:
    run = tmp_path / "run"
    proc = start_ranks(long_args(data, run))
    try:
        wait_for(proc, run / "checkpoints" / "last.pt")
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT_S + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed < TIMEOUT_S
    assert proc.returncode == 1, err
    assert "fewshot: error: rank 1" in err and "SIGKILL" in err and "--resume" in err
    saved = last(run)["step"]
    assert 10 <= saved < LONG and saved % 10 == 0
    res = launch(long_args(data, run) + ["--nproc", "2", "--resume"])
    assert res.returncode == 0, res.stderr
    assert_same_state(last(run), long_reference, atol=1e-4)


def test_ctrl_c_stops_every_rank_after_the_same_step(data, tmp_path, capsys, long_reference) -> None:
    """SIGINT to the launcher (a terminal's Ctrl-C): torchrun passes it to each rank once, the ranks agree
    on the step to stop after, rank 0 saves exactly that step, and the run resumes -- here on one rank --
    to the uninterrupted result."""
    run = tmp_path / "run"
    proc = start_ranks(long_args(data, run))
    try:
        wait_for(proc, run / "checkpoints" / "last.pt")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT_S + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "training state saved to" in err and "continue with --resume" in err
    saved = last(run)["step"]
    assert 10 <= saved < LONG
    rc, _, err = here(capsys, long_args(data, run) + ["--resume"])
    assert rc == 0, err
    assert_same_state(last(run), long_reference, atol=1e-4)


def test_a_rank_that_stops_answering_ends_the_run_after_the_timeout(data, tmp_path) -> None:
    """A rank that hangs (SIGSTOP: alive, so torchrun does not notice) leaves rank 0 waiting in a collective
    for $FEWSHOT_DIST_TIMEOUT seconds; then rank 0 stops with one line, torchrun ends the rest (SIGTERM,
    then SIGKILL after its own 30 s), and last.pt is the last complete checkpoint."""
    run = tmp_path / "run"
    env = dict(os.environ, FEWSHOT_DIST_TIMEOUT="5")
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", *map(str, long_args(data, run)), "--nproc", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, run / "checkpoints" / "last.pt")
        os.kill(_rank_pid(proc.pid, 1), signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # rank 0 gives up 5 s after the stop; torchrun then waits its fixed 30 s before killing the stopped rank
    assert time.monotonic() - stopped < 5 + 30 + 55
    assert proc.returncode == 1, err
    assert "fewshot: error: rank 0:" in err and "did not answer within 5 s" in err and "--resume" in err
    assert 10 <= last(run)["step"] < LONG


def test_eval_on_two_ranks_prints_one_process_accuracy(protonet_runs, capsys) -> None:
    one, _ = protonet_runs
    args = ["eval", one, "--episodes", "60", "--ways", "2", "--no-progress"]     # 60: uneven shares of 25
    rc, out, err = here(capsys, args)
    assert rc == 0, err
    (csv,) = (one / "eval").glob("2w1s*-seed0.csv")
    csv_one = csv.read_text()
    res = launch(args + ["--nproc", "2"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == out.splitlines()[0]
    assert "60 episodes" in out
    assert csv.read_text() == csv_one       # rank 0 wrote every episode's score, in episode order


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("flags, message", [
    (["--nproc", "0"], "--nproc must be a number of processes >= 1, got 0"),
    (["--nproc", "-1"], "--nproc must be a number of processes >= 1, got -1"),
    (["--nproc", "2", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:29400"],
     "--rdzv-endpoint no-such-host.invalid:29400: cannot resolve host"),
    (["--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "29400"], "expected HOST:PORT"),
    (["--nnodes", "2"], "give --nproc too"),
    (["--task-group", "3"], "--task-group 3 does not divide the 2 tasks each process takes per step"),
])
def test_bad_launch_flags_are_one_line_errors(flags, message, data, tmp_path, capsys) -> None:
    rc, _, err = here(capsys, train_args("protonet", data, tmp_path / "run", 1) + flags)
    assert rc == 2
    assert err.startswith("fewshot: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_more_ranks_than_cores_warns(capsys) -> None:
    distributed.check_nproc(10_000, "cpu")
    err = capsys.readouterr().err
    assert "warning: --nproc 10000 is more than the" in err and "CPU cores" in err


def test_single_process_is_a_no_op(monkeypatch) -> None:
    """Outside torchrun: one rank of one, every share the whole, every reduction the identity."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.share(25) == slice(0, 25)
    assert distributed.any_rank(True, False) == (True, False)
    assert distributed.reduce_step([], [], [1.5, 2.0]) == [1.5, 2.0]
    assert distributed.gather_in_order([0, 1], [0.5, 0.25]) == ([0.5, 0.25],)
    assert distributed.init("cpu") == torch.device("cpu") and not distributed.active()
    distributed.check_batch(3)


def test_batch_must_split_equally_and_backend_follows_the_device(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(FewshotError, match="--batch 3: 2 ranks cannot share 3 tasks per step equally"):
        distributed.check_batch(3)
    distributed.check_batch(4)
    with pytest.raises(FewshotError, match="--task-group 4 does not divide the 3 tasks each process takes"):
        distributed.check_batch(6, 4)
    distributed.check_batch(6, 3)
    assert distributed.backend(torch.device("cpu")) == "gloo"
    assert distributed.backend(torch.device("cuda", 1)) == "nccl"


def test_timeout_setting_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("FEWSHOT_DIST_TIMEOUT", "soon")
    with pytest.raises(FewshotError, match="FEWSHOT_DIST_TIMEOUT must be a number of seconds"):
        distributed.timeout_s()
    monkeypatch.setenv("FEWSHOT_DIST_TIMEOUT", "12.5")
    assert distributed.timeout_s() == 12.5
