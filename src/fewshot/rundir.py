"""Run folders: which files fewshot may replace, who is using a folder, and writes that survive any stop.

A folder that ``fit`` creates holds a manifest, ``.fewshot-run``: a JSON header line, then one JSON line
per file fewshot wrote there (``{"wrote": "eval/5w1s15q-seed0.json"}``), appended by :func:`record` as
the files are written (config, class lists, metrics, checkpoints, evaluations, plots, predictions). Only
these files are ever deleted: ``--overwrite`` (and a fresh run in a marked folder whose earlier run never
saved a checkpoint) removes the listed files, their leftover temporary copies and the folders that become
empty, and leaves anything else (the user's own files) where it is. A folder without the manifest is
replaced only if it is a run of an earlier fewshot version (``checkpoints/last.pt`` loads as a fewshot run
checkpoint); then only the files fewshot is known to write are removed (:data:`TRAINING_FILES`,
``predictions.csv`` with fewshot's header, and ``eval/`` results that carry fewshot's keys). Any other
folder that holds one of the names a run writes is refused rather than mixed with a new run.

While a run uses a folder it holds an ``fcntl.flock`` on ``.fewshot-lock`` there, which names the holder
(pid, host, start time, command). The kernel drops the lock when the process ends, however it ends, so a
SIGKILL leaves no stale lock. A second run on the folder, or an ``--overwrite`` of it, is refused naming
the holder.

Files that a resume reads back are replaced atomically (:func:`atomic_write`: a temporary file in the same
folder, fsynced, renamed over the target, then the folder fsynced), so a stop at any moment leaves either the
old or the new file; the temporary files of a stopped process are removed when the next run takes the lock.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shlex
import socket
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, List, Optional

from .errors import FewshotError

MARKER = ".fewshot-run"
LOCK = ".fewshot-lock"
FORMAT = "fewshot-run/1"
#: the files a training run writes, relative to its folder; a folder without the manifest that holds any of
#: them is not a place to start a run (it would mix the two or overwrite files fewshot did not write)
TRAINING_FILES = ("config.yaml", "classes_train.txt", "classes_val.txt", "classes_test.txt", "metrics.csv",
                  "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/pretrain.pt")
#: the checkpoints a run can be resumed from: the episodic stage's, else the pretraining stage's
#: (:mod:`fewshot.pretrain`; a run stopped before its first episodic checkpoint)
RESUMABLE = ("checkpoints/last.pt", "checkpoints/pretrain.pt")
#: the settings a resumed run may change, as long as they only extend it (new value >= old); True marks
#: those where 0 means 'no limit'
EXTENDABLE = {"train.episodes": False, "train.time_limit_s": True}
_TEMP = re.compile(r"^\..+\.tmp\d+$")
_PREDICTIONS_HEADER = "query,predicted,probability"


# ------------------------------------------------------------------------------------------ atomic writes
def temp_path(path: Path) -> Path:
    """The temporary sibling ``.NAME.tmpPID`` that :func:`atomic_write` writes ``path`` through."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where the file system cannot sync folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace ``path`` by what ``write(temporary_path)`` writes: the temporary file is fsynced, renamed over
    ``path`` and the folder fsynced, so ``path`` is always either the old or the complete new file. The file
    is recorded in its run folder's manifest (:func:`record`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    record(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------------------------------ the manifest
def _manifest(folder: Path) -> tuple:
    """(header dict or None, [relative paths fewshot wrote]) of ``folder``'s manifest; lines that are not
    complete JSON (a stop during an append) are skipped."""
    marker = folder / MARKER
    if not marker.is_file():
        return None, []
    header, files = None, []
    try:
        text = marker.read_text(errors="replace")
    except OSError:
        return None, []
    for i, line in enumerate(text.split("\n")[:-1]):        # the part after the last newline is incomplete
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if i == 0 and entry.get("format") == FORMAT:
            header = entry
        elif isinstance(entry.get("wrote"), str) and entry["wrote"] not in files:
            files.append(entry["wrote"])
    return header, files


def is_marked(folder: Path) -> bool:
    """Whether ``folder`` was created by fewshot (holds a valid manifest)."""
    return _manifest(Path(folder))[0] is not None


def written_files(folder: Path) -> List[str]:
    """The files (relative POSIX paths) that fewshot's manifest in ``folder`` lists as written by fewshot."""
    return _manifest(Path(folder))[1]


def record(path: str | os.PathLike) -> None:
    """Note in the manifest of the run folder holding ``path`` (its folder or the one above: fewshot writes
    at most one folder deep) that fewshot wrote it, so that replacing the run removes it. Does nothing for a
    file outside any run folder. Every writer of files in a run folder calls this once the file is written."""
    path = Path(os.path.abspath(path))
    for root in (path.parent, path.parent.parent):
        marker = root / MARKER
        if not marker.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel in (MARKER, LOCK) or rel in _manifest(root)[1]:
            return
        with open(marker, "a") as fh:                      # one short write: appends never interleave
            fh.write(json.dumps({"wrote": rel}) + "\n")
        return


def _write_manifest(folder: Path, files: Iterable[str]) -> None:
    lines = [json.dumps({"format": FORMAT, "created": _now()})] + [json.dumps({"wrote": f}) for f in files]
    path = folder / MARKER
    tmp = temp_path(path)
    tmp.write_text("".join(l + "\n" for l in lines))
    os.replace(tmp, path)
    fsync_dir(folder)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _inside(folder: Path, rel: str) -> Optional[Path]:
    """``folder/rel`` when ``rel`` is a plain relative path that stays inside ``folder`` through real folders
    (no ``..``, no absolute path, no symbolic link on the way); else None."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        return None
    cur = folder
    for part in p.parts[:-1]:
        cur = cur / part
        if cur.is_symlink() or not cur.is_dir():
            return None
    return cur / p.parts[-1]


def _remove(folder: Path, files: Iterable[str]) -> None:
    """Delete the listed files of ``folder`` (and their leftover temporary copies), then the folders among
    their parents that are left empty; never anything else."""
    parents = set()
    for rel in files:
        target = _inside(folder, rel)
        if target is None:
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        _clean_temp(target.parent, only=target.name)
        parents.update(q for q in target.relative_to(folder).parents if str(q) != ".")
    for rel in sorted(parents, key=lambda q: -len(q.parts)):       # deepest first
        with contextlib.suppress(OSError):
            (folder / rel).rmdir()                                  # only succeeds when empty


def _clean_temp(folder: Path, only: Optional[str] = None) -> None:
    """Remove the temporary files ``.NAME.tmpPID`` that :func:`atomic_write` leaves when a process stops in
    the middle of a write (all of them, or those of file ``only``)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _TEMP.match(p.name) and (only is None or p.name.startswith(f".{only}.tmp")) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()


def _legacy_files(folder: Path) -> List[str]:
    """The files of an earlier-version run folder (no manifest) that fewshot is known to have written."""
    found = [f for f in TRAINING_FILES if (folder / f).is_file()]
    pred = folder / "predictions.csv"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if pred.is_file() and pred.open().readline().strip() == _PREDICTIONS_HEADER:
            found.append("predictions.csv")
    ev = folder / "eval"
    if ev.is_dir() and not ev.is_symlink():
        for js in sorted(ev.glob("*.json")):
            try:
                d = json.loads(js.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if isinstance(d, dict) and ("checkpoint_step" in d or {"runs", "error_rate"} <= set(d)):
                found.append(f"eval/{js.name}")
                if js.with_suffix(".csv").is_file():
                    found.append(f"eval/{js.stem}.csv")
    return found


def _is_legacy_run(folder: Path) -> bool:
    """An earlier version's run folder: no manifest, and ``checkpoints/last.pt`` loads as a run checkpoint."""
    from . import checkpoint
    last = folder / "checkpoints" / "last.pt"
    if not last.is_file():
        return False
    try:
        ck = checkpoint.load(last)
    except FewshotError:
        return False
    return "method" in ck and "model" in ck


# ------------------------------------------------------------------------------------------ checks
def check_out(out: str | os.PathLike) -> None:
    """``--out`` must be a folder fewshot can write in, or a path that can become one; anything else is a
    one-line error before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FewshotError(f"--out {out} is a file, not a run folder; choose another --out")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise FewshotError(f"--out {out}: {probe} is a file, so the run folder cannot be created there")
    try:
        fd, name = tempfile.mkstemp(prefix=".fewshot-probe", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise FewshotError(f"--out {out}: cannot write in {probe} ({e.strerror or e})") from None


def changed_settings(old: dict, new: dict, extend: Optional[dict] = None) -> List[str]:
    """``"name: old -> new"`` for every setting that differs between two config dicts (nested keys joined by
    dots, ``train.`` left off), except the ``extend`` settings (default :data:`EXTENDABLE`) when they grow."""
    extend = EXTENDABLE if extend is None else extend

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(old), flat(new)
    diffs = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if _same(key, va, vb) or key in extend and _extends(va, vb, zero_is_unlimited=extend[key]):
            continue
        name = key[len("train."):] if key.startswith("train.") else key
        diffs.append(f"{name}: {_show(va)} -> {_show(vb)}")
    return diffs


def _extends(old, new, zero_is_unlimited: bool) -> bool:
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return False
    if zero_is_unlimited:
        return new == 0 or (old != 0 and new >= old)
    return new >= old


def _same(key: str, a, b) -> bool:
    if a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
        return True
    if key == "device":                                  # "auto" and what it resolves to here are the same
        from .precision import resolve_device
        with contextlib.suppress(FewshotError):
            return resolve_device(a) == resolve_device(b)
    if key in ("data", "attributes") and isinstance(a, str) and isinstance(b, str):
        with contextlib.suppress(OSError):
            return os.path.samefile(a, b)               # the same folder written another way
    return False


def _show(v) -> str:
    return "(unset)" if v is None else repr(v) if isinstance(v, str) else str(v)


# ------------------------------------------------------------------------------------------ the run folder
class RunFolder:
    """A run folder claimed for one ``fit``: use as a context manager around the whole run.

    On entry the folder is checked (``--out`` writable; ``resume`` needs a run; without ``overwrite`` an
    existing run is refused; a folder fewshot did not create is never replaced) and, when it already is a
    run, locked; nothing is changed yet. :meth:`create` is called once the run is ready to write (data
    loaded, settings resolved): it creates and locks the folder, removes what ``overwrite`` replaces, cleans
    leftover temporary files, refuses a resume whose settings differ, and writes ``config.yaml``. The lock
    is released on exit.
    """

    def __init__(self, out: str | os.PathLike, resume: bool = False, overwrite: bool = False):
        self.path = Path(out)
        self.resume, self.overwrite = bool(resume), bool(overwrite)
        self._fd: Optional[int] = None
        self._legacy_seen: Optional[bool] = None

    def _legacy(self) -> bool:
        """Whether the folder is an earlier version's run (loading its checkpoint once per lock state)."""
        if self._legacy_seen is None:
            self._legacy_seen = self.path.is_dir() and not is_marked(self.path) and _is_legacy_run(self.path)
        return self._legacy_seen

    # ---------------------------------------------------------------- context
    def __enter__(self) -> "RunFolder":
        if self.resume and self.overwrite:
            raise FewshotError("--resume continues the run in --out and --overwrite replaces it; pass one")
        check_out(self.path)
        if self.path.is_dir() and (is_marked(self.path) or self._legacy()):
            self._lock()
        try:
            self._check()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give up the lock (the kernel does so too when the process ends)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    # ---------------------------------------------------------------- checks
    def _check(self) -> None:
        out, last = self.path, self.path / "checkpoints" / "last.pt"
        marked = out.is_dir() and is_marked(out)
        saved = next((out / f for f in RESUMABLE if (out / f).is_file()), None)
        if self.resume:
            if saved is None:
                raise FewshotError(f"nothing to resume: {last} does not exist")
            if saved != last:               # a run stopped during pretraining (fewshot.pretrain reads it)
                if not marked:
                    raise FewshotError(f"nothing to resume: {out} is not a fewshot run folder (no {MARKER})")
                return
            if not marked and not self._legacy():
                from . import checkpoint
                checkpoint.load(last)                     # names what is wrong with it
                raise FewshotError(f"nothing to resume: {last} is not a fewshot run checkpoint")
            return
        if not out.is_dir():
            return
        if marked or self._legacy():
            if saved is not None and not self.overwrite:
                raise FewshotError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                                   "replace it, or choose another --out")
            return
        clash = next((f for f in TRAINING_FILES if os.path.lexists(out / f)), None)
        if clash is not None:
            what = "will not --overwrite it" if self.overwrite else "will not write a run into it"
            raise FewshotError(f"{out} holds {clash} but is not a fewshot run folder (no {MARKER}); fewshot "
                               f"replaces only files it wrote, so it {what}: choose another --out")

    # ---------------------------------------------------------------- lock
    def _lock(self) -> None:
        if self._fd is not None:
            return
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FewshotError(f"{self.path} is in use by another run ({holder}); wait for it to end or choose "
                               "another --out") from None
        cmd = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])
        info = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}: {cmd}"
        os.ftruncate(fd, 0)
        os.write(fd, info.encode()[:4000])
        self._fd = fd
        self._legacy_seen = None                 # what was seen before the lock may have changed

    @property
    def locked(self) -> bool:
        return self._fd is not None

    # ---------------------------------------------------------------- create
    def create(self, cfg) -> None:
        """Make the folder ready for the run configured by ``cfg`` (a :class:`~fewshot.config.RunConfig`,
        fully resolved) and write its ``config.yaml``; see the class docstring."""
        out = self.path
        out.mkdir(parents=True, exist_ok=True)
        if not self.locked:          # a folder that was not a run on entry: lock, then look again under the lock
            self._lock()
            self._check()
        for folder in (out, out / "checkpoints"):
            _clean_temp(folder)
        header, files = _manifest(out)
        if not self.resume:
            if header is not None:
                _remove(out, files)
            elif self._legacy():
                _remove(out, _legacy_files(out))
            _write_manifest(out, [])
        else:
            self._refuse_changes(cfg)
            if header is None:                              # an earlier version's run: adopt its files
                _write_manifest(out, _legacy_files(out))
        atomic_write(out / "config.yaml", cfg.save)

    def _refuse_changes(self, cfg) -> None:
        from .config import RunConfig
        saved = self.path / "config.yaml"
        if not saved.is_file():
            return
        old = RunConfig.load(saved)
        diffs = changed_settings(old.to_dict(), cfg.to_dict())
        if diffs:
            raise FewshotError(f"--resume would change the settings of the run in {self.path}: "
                               f"{', '.join(diffs)}; a resumed run can only be extended (more --episodes, a "
                               "longer --time-limit-s): start a new run with another --out to change them")

    def write_text(self, rel: str, text: str) -> None:
        """Write the run file ``rel`` (atomically, recorded). On resume a file that exists must not change:
        it was derived from the data and settings the run started with (the class lists of the split)."""
        path = self.path / rel
        if self.resume and path.is_file():
            if path.read_text() != text:
                raise FewshotError(f"--resume: {path} would change (the data or its split differ from the run's); "
                                   "start a new run with another --out")
            return
        write_text(path, text)

