"""Task-parallel worker processes for the per-task loop of gradient-based methods (CPU).

On a CPU, one process running tasks one after another on 2 intra-op threads uses the cores poorly: the
per-task tensors are small and many operations do not split well over threads. Running the task batch in
``P`` single-threaded processes, each with its own share of the tasks, uses every core fully. The main
process computes the first share itself; each worker is a plain ``python -m fewshot.parallel`` child
(no ``fork`` of a process whose OpenMP threads are running, no re-import of the user's ``__main__``) that
receives the method's state and its tasks over a pipe and sends back the per-task results.

The arithmetic of every task is exactly the single-process loop's; only the order in which per-task
results are stacked is fixed (task order), so results match the loop up to float summation order
downstream (tested).

Training and evaluation on the CPU call :func:`tune_allocator` (the task loop in its own process and in
every worker too). Temporaries are allocated and freed thousands of times per step (per-task tensors of
0.5-15 MB in the task loop; a 60-way Omniglot episode's first feature map is 120 MB), and glibc's default
``malloc`` hands every block over 32 MB, and most freed memory, back to the kernel, so every new one costs
page faults (about 1,500 for the support pass of one second-order MAML task on Omniglot and its second
derivative alone, a few microseconds each on a virtual machine; about a third of a 60-way Omniglot
prototypical-network step on a 2-core AMD EPYC).
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import weakref
from typing import Any, List, Optional

import torch

from .errors import FewshotError

_HEADER = struct.Struct("<Q")

# glibc mallopt parameters, and the values tune_allocator gives them (a glibc that refuses an mmap threshold
# over its HEAP_MAX_SIZE / 2, 32 MB, gets FALLBACK_MMAP_THRESHOLD)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD, FALLBACK_MMAP_THRESHOLD = 1 << 30, 1 << 30, 32 << 20
#: the same settings as glibc environment variables, for processes fewshot does not run itself
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_tuned: Optional[bool] = None


def tune_allocator() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process instead of returning it to the
    kernel: blocks up to 1 GB (32 MB where glibc refuses more) come from the heap (not fresh ``mmap`` pages),
    and up to 1 GB of free heap is kept; page faults on every large temporary go. The price is fragmentation
    of the heap, measured on a 2-core AMD EPYC: peak memory 0-10 % higher for a 60-way Conv-4 prototypical
    network step (a third less time), 51 % higher for a ResNet-12 one at 84x84 (4.6 -> 6.9 GB; 18 % less
    time); the gradient-based task loop's per-task tensors stay under 32 MB, where nothing changed.

    Called once per process by training and evaluation on the CPU and by the gradient-based methods' CPU task
    loop (here and in each worker). Does nothing on other C libraries, or when the environment sets
    ``FEWSHOT_TUNE_MALLOC=0``. Returns whether the settings were applied."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("FEWSHOT_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mmap = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(
            libc.mallopt(_M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD))
        _tuned = mmap and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):     # musl and other C libraries: _tuned stays False
        pass
    return _tuned


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _recv(stream):
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("worker pipe closed")
    (n,) = _HEADER.unpack(head)
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("worker pipe closed")
        buf += chunk
    return pickle.loads(bytes(buf))


class TaskPool:
    """``workers`` helper processes holding a copy of one method: :meth:`submit`, then :meth:`collect`.

    The processes end when the pool is closed, garbage-collected or the interpreter exits."""

    def __init__(self, method, workers: int):
        self.workers = int(workers)
        self.procs: List[subprocess.Popen] = []
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        init = {"method": method.name, "config": method.config_dict(), "in_shape": list(method.in_shape)}
        for _ in range(self.workers):
            # a session of its own: the terminal's Ctrl-C goes to the parent alone, even while a worker starts
            p = subprocess.Popen([sys.executable, "-m", "fewshot.parallel"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, start_new_session=True)
            _send(p.stdin, init)
            self.procs.append(p)
        # a finaliser, not atexit.register(self.close): that would keep every pool (and its processes)
        # alive until exit
        self._finalizer = weakref.finalize(self, _stop, self.procs)

    def submit(self, method, fn_name: str, tensors: tuple, shares: List[slice], with_grad: bool,
               kwargs: Optional[dict] = None) -> int:
        """Send each of ``shares`` (slices of the task axis of ``tensors``) to a worker, with the method's
        current state, mode and autocast setting; returns how many requests went out (see :meth:`collect`)."""
        if len(shares) > len(self.procs):
            raise ValueError("more shares than workers")
        state = {k: v.detach().cpu() for k, v in method.state_dict().items()}
        ac = torch.is_autocast_enabled("cpu")
        msg = {"state": state, "training": method.training, "fn": fn_name, "with_grad": with_grad,
               "kwargs": kwargs or {}, "autocast": torch.get_autocast_dtype("cpu") if ac else None,
               "channels_last": bool(getattr(getattr(method, "net", None), "channels_last", False)),
               "dtype": next(iter(state.values())).dtype if state else torch.float32}
        for p, sl in zip(self.procs, shares):
            _send(p.stdin, {**msg, "tensors": tuple(t[sl].cpu() for t in tensors)})
        return len(shares)

    def collect(self, n: int) -> List[Any]:
        """The results of the first ``n`` workers, in order."""
        out = []
        for p in self.procs[:n]:
            reply = _recv(p.stdout)
            if isinstance(reply, dict) and "error" in reply:
                raise FewshotError(f"task worker failed: {reply['error']}")
            out.append(reply)
        return out

    def close(self) -> None:
        self._finalizer()


def _stop(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.stdin.close()
            p.wait(timeout=5)
        except Exception:
            p.kill()
    procs.clear()


def _serve() -> None:
    """Worker loop: build the method once, then answer map requests until stdin closes. SIGINT is ignored:
    the terminal's Ctrl-C is meant for the parent, which finishes its step and then stops the workers."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import methods
    from .models import set_channels_last
    torch.set_num_threads(1)
    tune_allocator()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    init = _recv(inp)
    method = methods.build(init["method"], init["in_shape"], load_pretrained=False, **init["config"])
    method.config.vectorize = "loop"
    layout, dtype = None, torch.float32
    while True:
        try:
            msg = _recv(inp)
        except EOFError:
            return
        try:
            if msg["channels_last"] != layout:
                set_channels_last(method, msg["channels_last"])
                layout = msg["channels_last"]
            if msg["dtype"] != dtype:       # a model converted with .double() (or back)
                method.to(msg["dtype"])
                dtype = msg["dtype"]
            method.load_state_dict(msg["state"])
            method.train(msg["training"])
            ctx = torch.autocast("cpu", dtype=msg["autocast"]) if msg["autocast"] is not None \
                else torch.autocast("cpu", enabled=False)
            with ctx:
                res = method.local_map(msg["fn"], method.meta_params(), *msg["tensors"],
                                       with_grad=msg["with_grad"], **msg["kwargs"])
            _send(out, res)
        except Exception as e:  # report to the parent instead of dying silently
            _send(out, {"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    _serve()
