"""Shared helpers for the benchmark scripts: where the data and the peers live, a table printer."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEWSHOT_SHARED", ROOT.parent / "shared"))
OMNIGLOT = SHARED / "data" / "omniglot"
ANCHORS = SHARED / "anchors"
PEERS_PYTHON = Path(os.environ.get("PEERS_VENV", Path.home() / ".venv-peers")) / "bin" / "python"
TEST_ALPHABETS = ["Korean", "Tagalog"]

#: ``--isa`` choices: environment variables that make ATen's kernels, oneDNN's convolutions and MKL's BLAS use
#: at most that instruction set, to measure an older CPU's code paths on a newer one (e.g. AVX2-only on an
#: AMX part). A benchmark re-executes itself with them, so every process it starts, peers included, has them.
ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


def use_isa(isa: str) -> None:
    """Run this script under ``ISA_ENV[isa]``: re-execute it with those variables unless they are already set
    (they must be in place before the libraries start; a child process inherits them)."""
    env = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from fewshot.precision import cpu_hardware_tier, cpu_isa
    isa, hw = cpu_isa(), cpu_hardware_tier()
    emulated = " ".join(f"{k}={os.environ[k]}" for k in ISA_ENV["avx2"] if k in os.environ)
    isa = f"ISA {isa}" + (f" (hardware {hw}; {emulated})" if isa != hw or emulated else "")
    return (f"{os.cpu_count()} cores ({cpu}), {isa}, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def ratio_summary(ratios: list, unit: str = "") -> str:
    """Per-round ratios to the peer's run of the same round, as the median (with ``unit``) and the range."""
    return f"{statistics.median(ratios):.2f}{unit}" + (
        f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def table(rows: list, headers: list) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def peer_protonet_train_speed(episodes: int = 200, env: dict | None = None) -> float | None:
    """easyfsl's training speed (episodes/s) from ../shared/anchors/anchor_protonet_easyfsl.py.

    The anchor prints ``ep N loss L Ts`` every 200 training episodes and evaluates 4 000 test episodes
    afterwards; only its training speed is needed here, so the run is stopped at the first progress line.
    ``env``: extra environment variables for the peer's process (the allocator control).
    """
    if not PEERS_PYTHON.exists() or not (ANCHORS / "anchor_protonet_easyfsl.py").exists():
        return None
    p = subprocess.Popen([str(PEERS_PYTHON), "anchor_protonet_easyfsl.py", str(episodes)], cwd=ANCHORS,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, **(env or {})))
    try:
        for line in p.stdout:
            parts = line.split()
            if len(parts) >= 5 and parts[0] == "ep" and parts[-1].endswith("s"):
                return int(parts[1]) / float(parts[-1][:-1])
    finally:
        p.kill()
        p.wait()
    raise RuntimeError("the easyfsl anchor printed no progress line")


def fit_fresh(cfg, out: Path) -> tuple:
    """Train ``cfg`` into ``out`` (an earlier run there is deleted), printing the machine first.

    Returns ``(run, wall_s)``; ``run.train_result`` holds the steps and the training time."""
    import fewshot as fs
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    print(f"machine: {machine()}", flush=True)
    t0 = time.time()
    run = fs.fit(cfg, out, progress=False)
    return run, time.time() - t0


def load_trained(out: Path) -> tuple:
    """A run already trained in ``out``, printing the machine first: ``(run, steps, training seconds)``
    from its last checkpoint (for ``--eval-only``, which re-tests a run without training it again)."""
    import fewshot as fs
    from fewshot import checkpoint
    run = fs.load_run(out)
    print(f"machine: {machine()}", flush=True)
    last = checkpoint.load(Path(out) / "checkpoints" / "last.pt")
    return run, int(last["step"]), float(last["train_time_s"])


def evaluate_settings(run, settings, episodes: int, queries: int = 15, tta: int | None = None,
                      finetune_steps: int | None = None, finetune_lr: float | None = None) -> list:
    """Evaluate ``run`` at every ``(ways, shots)`` of ``settings`` on ``episodes`` fixed-seed test episodes,
    printing each result as it comes: ``[(ways, shots, result, seconds), ...]``. ``tta``: test-time
    augmentation copies, ``finetune_steps``/``finetune_lr``: test-time fine-tuning (default: the run's
    settings)."""
    import fewshot as fs
    out = []
    for w, k in settings:
        t = time.time()
        r = fs.evaluate_run(run, ways=w, shots=k, queries=queries, episodes=episodes, progress=False, tta=tta,
                            finetune_steps=finetune_steps, finetune_lr=finetune_lr)
        print(f"{w}w{k}s: {r}", flush=True)
        out.append((w, k, r, time.time() - t))
    return out


def run_row_processes(script: str, keys: list, row_args: list, out: Path, jobs: int, threads: int) -> list:
    """Run ``python SCRIPT --row KEY ROW_ARGS...`` for every key, ``jobs`` processes at a time, each with
    ``threads`` OpenMP threads and its output in ``OUT/KEY.log``; returns the keys whose process failed."""
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    todo, running, failed = list(keys), [], []
    while todo or running:
        while todo and len(running) < jobs:
            k = todo.pop(0)
            log = open(out / f"{k}.log", "w")
            p = subprocess.Popen([sys.executable, script, "--row", k, *row_args], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
            running.append((k, p, log))
            print(f"started {k}", flush=True)
        time.sleep(2)
        for item in list(running):
            k, p, log = item
            if p.poll() is not None:
                log.close()
                running.remove(item)
                print(f"finished {k} (exit {p.returncode})", flush=True)
                if p.returncode:
                    failed.append(k)
    return failed


class RowResults:
    """Finished benchmark rows in a JSON-lines file, one object with a ``"key"`` per line; a later line for
    the same key replaces an earlier one. Row processes :meth:`append`; the driver asks what is
    :meth:`pending`, :meth:`forget`\\ s rows to rerun them, and reads the :meth:`latest` rows for its table."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list:
        if not self.path.exists():
            return []
        import json
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]

    def append(self, row: dict) -> None:
        import json
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def forget(self, keys: list) -> None:
        """Drop the rows of ``keys`` (the others stay)."""
        import json
        if self.path.exists():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows() if r["key"] not in keys))

    def pending(self, keys: list) -> list:
        """The ``keys`` with no row yet, in order."""
        done = {r["key"] for r in self.rows()}
        return [k for k in keys if k not in done]

    def latest(self, order: list, keys: list | None = None) -> list:
        """The last row of each key (only ``keys`` if given), sorted as ``order`` (unknown keys last)."""
        pos = {k: i for i, k in enumerate(order)}
        last = {r["key"]: r for r in self.rows() if keys is None or r["key"] in keys}
        return sorted(last.values(), key=lambda r: pos.get(r["key"], len(pos)))


def add_row_options(ap, out: str, jobs: int = 2, threads: int = 1) -> None:
    """The options every row-process benchmark takes (see :func:`drive_rows`)."""
    ap.add_argument("--jobs", type=int, default=jobs, help="row processes at a time")
    ap.add_argument("--threads", type=int, default=threads, help="torch threads per row process")
    ap.add_argument("--out", default=out, help="run directories and row logs")
    ap.add_argument("--results", default=None, help="JSON-lines row file (default: OUT/rows.jsonl)")
    ap.add_argument("--fresh", action="store_true", help="rerun the selected rows")
    ap.add_argument("--row", help=argparse.SUPPRESS)


def add_budget_options(ap, minutes: float, unit: str = "steps") -> None:
    """``--minutes`` (a wall-clock training budget per row) and ``--steps`` (exactly that many training
    ``unit`` instead, which a shared machine's load cannot shorten); see :func:`budget_args` and
    :func:`set_budget`."""
    ap.add_argument("--minutes", type=float, default=minutes, help="training budget of every row (minutes)")
    ap.add_argument("--steps", type=int, default=0,
                    help=f"train every row exactly this many {unit} instead of --minutes (0: use --minutes)")


def budget_args(a) -> list:
    """The budget options of :func:`add_budget_options`, to forward to a row process."""
    return ["--minutes", str(a.minutes), "--steps", str(a.steps)]


def set_budget(train, a, unbounded: int) -> None:
    """Set a ``TrainConfig``'s length: exactly ``--steps`` steps without a clock, or ``unbounded`` steps
    stopped by the ``--minutes`` time limit."""
    if a.steps:
        train.episodes, train.time_limit_s = a.steps, 0.0
    else:
        train.episodes, train.time_limit_s = unbounded, a.minutes * 60


def drive_rows(script: str, a, keys: list, run_row, forward: list):
    """Run a row benchmark: in a row process (``--row KEY``) train and score that row and append it;
    otherwise start ``python SCRIPT --row KEY FORWARD...`` for each pending key (``--jobs`` at a time) and
    return ``(results, failed keys)`` for the table; ``None`` in a row process."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = RowResults(Path(a.results) if a.results else out / "rows.jsonl")
    if a.row:
        results.append(run_row(a.row, a))
        return None
    if a.fresh:
        results.forget(keys)
    print(f"# {machine()}", flush=True)
    failed = run_row_processes(script, results.pending(keys), [
        *forward, "--threads", str(a.threads), "--out", str(out), "--results", str(results.path)],
        out, a.jobs, a.threads)
    return results, failed


def exit_if_failed(failed: list, out) -> None:
    """After a row benchmark's table: name the rows whose process failed (their logs are in ``out``) and
    exit non-zero."""
    if failed:
        print(f"rows that failed: {', '.join(failed)} (see {out}/<row>.log)")
        sys.exit(1)
