"""Training and evaluation over several processes: ``torch.distributed``, started by ``torchrun``.

Launch with ``torchrun --nproc-per-node N -m fewshot train ...`` or ``fewshot train ... --nproc N`` (which
starts the same through :mod:`torch.distributed.run`); several machines join through torchrun's own c10d
rendezvous (``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint HOST:PORT``). The backend follows the
device: gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). In one process (no ``WORLD_SIZE`` in
the environment, or a world of 1) every function here is a no-op, so the trainer and the evaluator call
them unconditionally.

What N ranks compute, and how it compares with one process:

- **The global batch** (``--batch B`` tasks per step) is the same whatever the number of ranks: every rank
  draws the whole batch from the same seeded sampler (index work and a gather) and keeps its share,
  ``B / N`` consecutive tasks (:func:`share`; ``B`` must be a multiple of ``N``). The sampler's state is
  therefore identical on every rank, and a checkpoint written by N ranks resumes on M ranks.
- **Gradients** are averaged by one explicit ``all_reduce`` after ``backward`` (:func:`reduce_step`), not by
  ``DistributedDataParallel``: the gradient-based family hands the trainer a meta-gradient computed by its
  own (double) backward through the inner loop, per task and possibly in worker processes, which DDP's
  per-parameter hooks neither see nor handle; an explicit reduction after the whole backward works for
  every method alike. Each rank's loss is the mean over its ``B / N`` tasks, so the mean of the ranks'
  gradients is exactly the one-process gradient of the global batch's mean loss (up to float summation
  order), for every method whose loss is a mean over tasks. A combination that couples the tasks of a
  batch (MAML's ``combine: agreement``, TAML's inequality penalties) couples them within each rank's share.
- **Batch norm**: a network that sees a rank's tasks at once normalises over them (prototypical networks
  and the other metric methods with ``batch > 1``), so its batch statistics differ from one process's over
  the whole batch; ``--task-group G`` (the trainer's task groups) makes every forward pass see ``G`` tasks,
  in one process as on N ranks, and then the two agree. The gradient-based family normalises each task on
  its own, so it agrees without groups. Floating buffers (running statistics) are kept identical on every
  rank: each step starts from the same buffers, and afterwards every rank takes the mean, over ranks, of
  the change its forward passes made; one process with task groups takes the same mean over its groups.
  A running average that is linear in the batch statistics (BatchNorm's ``running_mean``, the MAML
  family's ``running`` mode) then equals one process's exactly; ``running_var`` of a network normalising
  over several tasks at once is the mean of the groups' variances, not the variance of their union.
- **Writing**: rank 0 alone claims and locks the run folder and writes the config, metrics, logs and
  checkpoints (atomically, as in one process; :func:`on_main` shares its errors with the other ranks);
  the others read ``last.pt`` when resuming. Only rank 0 shows a progress bar.
- **Evaluation** (validation and the final test): every rank draws the same fixed-seed episodes, scores its
  share of each batch, and the scores are gathered in episode order (:func:`gather_in_order`), so the
  numbers are one process's on the same episodes.
- **Stops**: a first Ctrl-C reaches every rank (torchrun forwards SIGINT); at the end of every step the
  ranks agree (:func:`any_rank`) on whether any of them was asked to stop or reached the time limit, so all
  stop after the same step and rank 0 saves it. A rank that dies ends the run: torchrun stops the others,
  and a rank that still waits on a collective gives up after ``$FEWSHOT_DIST_TIMEOUT`` seconds (default
  300) with a one-line :class:`DistributedError`; ``last.pt`` is the last complete checkpoint.
- **Resume**: exact; on a different number of ranks everything but the float summation order of the
  gradient reduction (and of batch statistics without task groups) carries over.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .errors import FewshotError

TIMEOUT_ENV = "FEWSHOT_DIST_TIMEOUT"
#: seconds a collective (and the rendezvous) may wait for the other ranks before the run stops
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """Another rank stopped or did not answer in time; the message is one line and says what to do."""


# ------------------------------------------------------------------------------------------ who am I
def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``RANK``/``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def world() -> int:
    """Number of ranks (1 in one process)."""
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 in one process)."""
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return rank() == 0


def timeout_s() -> float:
    """``$FEWSHOT_DIST_TIMEOUT`` in seconds (default :data:`DEFAULT_TIMEOUT_S`)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise FewshotError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def backend(device: torch.device) -> str:
    """The process-group backend for ranks on ``device``: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device) -> torch.device:
    """Join the process group torchrun set up (once; later calls and single processes do nothing) and
    return the device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK``, anything else stays."""
    device = torch.device(device)
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        torch.distributed.init_process_group(backend(device),
                                             timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {os.environ['RANK']}: cannot join the other ranks ({_first_line(e)})") \
            from None
    atexit.register(_teardown)
    return device


def _teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:   # a peer already gone: nothing left to tidy
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _comm_device() -> torch.device:
    """Where tensors handed to collectives live (NCCL needs them on this rank's GPU)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn: Callable):
    """Run a collective; a peer that died or timed out becomes a one-line :class:`DistributedError`."""
    try:
        return fn()
    except RuntimeError as e:       # DistBackendError, a gloo timeout or a closed connection
        raise DistributedError(
            f"rank {rank()}: {what} failed: another rank stopped, or did not answer within {timeout_s():g} s "
            f"(${TIMEOUT_ENV}) [{_first_line(e)}]; checkpoints/last.pt holds the last complete checkpoint: "
            "continue with --resume") from None


# ------------------------------------------------------------------------------------------ shares
def share(n: int) -> slice:
    """This rank's consecutive part of ``n`` items (rank r of N: items ``round(r n / N)`` up to the next
    rank's start); the whole range in one process."""
    w, r = world(), rank()
    return slice(round(r * n / w), round((r + 1) * n / w))


def check_batch(batch: int, group: int = 0) -> None:
    """Training shares the global batch equally: ``batch`` tasks must be a multiple of the ranks, and each
    rank's share a multiple of the task ``group`` (``--task-group``; 0: the whole share)."""
    if batch % world():
        raise FewshotError(f"--batch {batch}: {world()} ranks cannot share {batch} tasks per step equally; use a "
                           f"multiple of {world()} (the global batch is the same on any number of ranks)")
    if group and (batch // world()) % group:
        raise FewshotError(f"--task-group {group} does not divide the {batch // world()} tasks each process takes "
                           f"per step (--batch {batch} over {world()} rank(s))")


# ------------------------------------------------------------------------------------------ collectives
def on_main(fn: Callable, what: str = "rank 0's preparation"):
    """``fn()`` on rank 0 alone (its result is returned there; ``None`` on the others). An error on rank 0
    is raised there and, as a :class:`FewshotError` with the same message, on every other rank, so none
    waits for a rank that has stopped. In one process: ``fn()``."""
    if not active():
        return fn()
    failure: Optional[BaseException] = None
    result = None
    if is_main():
        try:
            result = fn()
        except BaseException as e:      # shared first, raised below
            failure = e
    msg = [None if failure is None else _first_line(failure)]
    _collective(what, lambda: torch.distributed.broadcast_object_list(msg, src=0))
    if failure is not None:
        raise failure
    if msg[0] is not None:
        raise FewshotError(msg[0])
    return result


def barrier(what: str = "waiting for the other ranks") -> None:
    """Wait until every rank gets here."""
    if active():
        _collective(what, lambda: torch.distributed.barrier())


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (once, before training)."""
    if not active():
        return
    dev = _comm_device()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.detach().to(dev)
        _collective("sharing rank 0's weights", lambda: torch.distributed.broadcast(buf, src=0))
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def any_rank(*flags: bool) -> Tuple[bool, ...]:
    """Each flag, true when it is true on any rank (one collective); the flags themselves in one process."""
    if not active():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=_comm_device())
    _collective("agreeing on a stop", lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX))
    return tuple(bool(v) for v in t.tolist())


def reduce_step(params: Sequence[torch.Tensor], buffers: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                scalars: Sequence[float]) -> List[float]:
    """After a step's backward: average across ranks, in one ``all_reduce`` per dtype,

    - the gradients of ``params`` (a gradient absent on a rank counts as zero; one absent on every rank
      stays ``None``, as in one process),
    - the change of each floating buffer: ``buffers`` holds ``(buffer, value at the start of the step)``
      pairs, and each buffer becomes its start plus the ranks' mean change,
    - ``scalars`` (the step's loss and metrics), returned averaged.

    In one process: nothing changes and ``scalars`` come back as they are."""
    if not active():
        return list(scalars)
    dev, n = _comm_device(), float(world())
    groups: dict = {}                  # dtype -> [(flat tensor, write-back)]

    def add(t: torch.Tensor, write) -> None:
        groups.setdefault(t.dtype, []).append((t.detach().reshape(-1).to(dev), write))

    for p in params:
        g = p.grad

        def write_grad(v, p=p, had=g is not None):
            value, present = v[:-1], v[-1]
            if had or float(present) > 0:
                p.grad = value.view_as(p).to(device=p.device, dtype=p.dtype)
        flat = (g if g is not None else torch.zeros_like(p)).detach().reshape(-1)
        add(torch.cat([flat, flat.new_tensor([1.0 if g is not None else 0.0])]), write_grad)
    for b, start in buffers:
        def write_buffer(v, b=b, start=start):
            with torch.no_grad():
                b.copy_(start + v.view_as(b).to(b.device, b.dtype))
        add(b - start, write_buffer)
    out: List[float] = []
    add(torch.tensor(list(scalars), dtype=torch.float64), lambda v: out.extend(v.tolist()))
    for dtype, items in groups.items():
        flat = torch.cat([t for t, _ in items])
        _collective("averaging gradients", lambda: torch.distributed.all_reduce(flat))
        flat /= n
        pos = 0
        for t, write in items:
            write(flat[pos:pos + t.numel()])
            pos += t.numel()
    return out


def gather_in_order(index: List[int], *columns: List[float]) -> Tuple[List[float], ...]:
    """Every rank's ``columns`` (lists of per-item values, item ``index[i]`` at position ``i``) merged
    into the order of ``index`` across ranks; returned on every rank. In one process: ``columns``."""
    if not active():
        return tuple(list(c) for c in columns)
    parts: List = [None] * world()
    mine = (list(index), [list(c) for c in columns])
    _collective("gathering evaluation scores", lambda: torch.distributed.all_gather_object(parts, mine))
    rows = sorted((i, [c[k] for c in cols]) for idx, cols in parts for k, i in enumerate(idx))
    return tuple([r[1][j] for r in rows] for j in range(len(columns)))


# ------------------------------------------------------------------------------------------ launching
def check_nproc(nproc: int, device: Optional[str] = None) -> None:
    """An impossible ``--nproc`` is an error; more ranks than CPU cores (or than GPUs, on CUDA) a warning."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise FewshotError(f"--nproc must be a number of processes >= 1, got {nproc!r}")
    on_cuda = (device or "auto").startswith("cuda") or ((device or "auto") == "auto" and torch.cuda.is_available())
    if on_cuda:
        have, what = torch.cuda.device_count(), "CUDA devices"
    else:
        have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        what = "CPU cores"
    if nproc > have:
        print(f"fewshot: warning: --nproc {nproc} is more than the {have} {what} here; the ranks will share them "
              "and run slower than fewer would", file=sys.stderr)


def check_endpoint(endpoint: str) -> Tuple[str, int]:
    """``HOST:PORT`` of a c10d rendezvous: the host must resolve, and a host that is not this machine must
    accept connections on the port within the timeout (the first node hosts the rendezvous)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FewshotError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT, e.g. node0.example:29400")
    host = host.strip("[]")
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
    except OSError as e:
        raise FewshotError(f"--rdzv-endpoint {endpoint}: cannot resolve host {host!r} ({e.strerror or e})") from None
    local = any(a.startswith("127.") or a == "::1" for a in addrs) or host in (socket.gethostname(),
                                                                               socket.getfqdn())
    if not local:
        try:
            socket.create_connection((host, int(port)), timeout=min(timeout_s(), 60.0)).close()
        except OSError as e:
            raise FewshotError(f"--rdzv-endpoint {endpoint}: no rendezvous answers there ({e.strerror or e}); "
                               "start the node that hosts it first, or check the address") from None
    return host, int(port)


def launch(argv: List[str], nproc: int, nnodes: str = "1", endpoint: Optional[str] = None,
           run_id: str = "fewshot", device: Optional[str] = None) -> int:
    """Run ``python -m fewshot ARGV`` as ``nproc`` ranks on this machine through :mod:`torch.distributed.run`
    (torchrun's own agent and rendezvous: standalone on one node, c10d at ``endpoint`` across ``nnodes``).
    Returns the exit status for the command line: 0, the first failed rank's own status when it reported
    an error itself (2: a user error, 130: Ctrl-C), else 1 with one line naming the rank that failed."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    check_nproc(nproc, device)
    timeout = timeout_s()
    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0", "--shutdown-timeout", str(int(timeout))]
    single = str(nnodes).strip() in ("1", "1:1")
    if single and endpoint is None:
        args += ["--standalone"]
    else:
        if endpoint is None:
            raise FewshotError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the c10d rendezvous every node "
                               "joins (the host of the first node)")
        check_endpoint(endpoint)
        args += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", run_id, "--rdzv-conf", f"join_timeout={int(timeout)}"]
    try:
        parsed = torchrun.parse_args(args + ["-m", "fewshot"])
        torchrun.parse_min_max_nnodes(str(nnodes))
    except (SystemExit, ValueError):
        raise FewshotError(f"--nnodes {nnodes}: expected a number of nodes or MIN:MAX") from None
    parsed.training_script_args = list(argv)     # given here: torchrun's parser would read fewshot's flags
    try:
        torchrun.run(parsed)
    except ChildFailedError as e:
        who, failure = e.get_first_failure()
        code = failure.exitcode
        if code in (2, 130):            # the rank said what went wrong itself (a user error, Ctrl-C)
            return code
        how = f"was killed by signal {failure.signal_name()}" if code < 0 else f"exited with status {code}"
        print(f"fewshot: error: rank {who} (pid {failure.pid}) {how}; the whole run stopped (checkpoints/last.pt "
              "holds the last complete checkpoint: continue with --resume)", file=sys.stderr)
        return 1
    except SignalException:             # Ctrl-C (or SIGTERM) reached torchrun, which passed it to the ranks
        return 130
    except RendezvousError as e:
        raise FewshotError(f"rendezvous failed ({_first_line(e)}): check --rdzv-endpoint and that every node "
                           "started") from None
    return 0
