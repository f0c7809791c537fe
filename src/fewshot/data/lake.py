"""The 20 Omniglot one-shot classification runs of Lake et al. (2015), ``all_runs.zip``.

Each run ``runNN`` holds ``training/classYY.png`` (20 characters, one image each), ``test/itemXX.png``
(20 query images) and ``class_labels.txt`` whose lines read ``runNN/test/itemXX.png
runNN/training/classYY.png``: a query and its true training image, as paths relative to the folder holding
the runs. The archive may hold ``run01`` ... ``run20`` at its root or inside one top folder; the same goes
for an extracted copy.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from ..errors import FewshotError
from .images import Preprocess, is_image_file, load_image
from .safezip import open_zip, read_member

LABELS_FILE = "class_labels.txt"
ZIP_NAME = "all_runs.zip"
_RUN_RE = re.compile(r"run(\d+)")
_LINE_FORMAT = "'runNN/test/itemXX.png runNN/training/classYY.png'"


@dataclass
class LakeRun:
    """One 20-way one-shot run.

    ``train[c]`` is the single example of class ``c`` (classes in sorted training file name order),
    ``test[i]`` a query whose true class is ``labels[i]``. Names are paths relative to the folder holding
    the runs (``run01/training/class01.png``).
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    labels: torch.Tensor
    test_names: list = field(default_factory=list)
    train_names: list = field(default_factory=list)

    @property
    def n_way(self) -> int:
        return self.train.shape[0]


# -------------------------------------------------------------------- sources: a folder or a zip
class _Tree(ABC):
    """Read-only view of files under a base folder (of a file system or a zip), by POSIX relative path."""

    @abstractmethod
    def files_in(self, rel: str) -> list[str]:
        """Names of the files directly in folder ``rel``."""

    @abstractmethod
    def is_file(self, rel: str) -> bool:
        """Whether ``rel`` is a file."""

    @abstractmethod
    def read(self, rel: str) -> bytes:
        """The bytes of file ``rel``."""

    @abstractmethod
    def label(self, rel: str) -> str:
        """How to name ``rel`` in messages."""


class _DirTree(_Tree):
    def __init__(self, base: Path):
        self.base = base

    def files_in(self, rel: str) -> list[str]:
        d = self.base / rel
        if not d.is_dir():
            return []
        return [p.name for p in d.iterdir() if p.is_file()]

    def is_file(self, rel: str) -> bool:
        return (self.base / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.base / rel).read_bytes()
        except OSError as e:
            raise FewshotError(f"cannot read {self.label(rel)}: {e.strerror or e}") from None

    def label(self, rel: str) -> str:
        return str(self.base / rel)


class _ZipTree(_Tree):
    def __init__(self, zf, archive: Path, prefix: str):
        self.zf = zf
        self.archive = archive
        self.prefix = prefix
        self.names = {n for n in zf.namelist() if not n.endswith("/")}

    def _member(self, rel: str) -> str:
        return self.prefix + rel

    def files_in(self, rel: str) -> list[str]:
        head = self._member(rel).rstrip("/") + "/"
        return [n[len(head):] for n in self.names if n.startswith(head) and "/" not in n[len(head):]]

    def is_file(self, rel: str) -> bool:
        return self._member(rel) in self.names

    def read(self, rel: str) -> bytes:
        return read_member(self.zf, self._member(rel), self.archive)   # bounded; corrupt members: one line

    def label(self, rel: str) -> str:
        return f"{self.archive}:{self._member(rel)}"


def _run_number(name: str) -> int:
    return int(_RUN_RE.fullmatch(name).group(1))


def _runs_in_dir(base: Path) -> list[str]:
    """Run folder names directly in ``base`` that hold a labels file, in run order."""
    if not base.is_dir():
        return []
    runs = [p.name for p in base.iterdir()
            if p.is_dir() and _RUN_RE.fullmatch(p.name) and (p / LABELS_FILE).is_file()]
    return sorted(runs, key=_run_number)


def _open_zip_runs(archive: Path) -> tuple[_Tree, list[str]] | None:
    """The runs in a zip (at its root or one folder down), or None if it holds none."""
    zf = open_zip(archive)
    by_prefix: dict[str, set] = {}
    for n in zf.namelist():
        parts = n.split("/")
        if parts[-1] != LABELS_FILE or len(parts) not in (2, 3) or not _RUN_RE.fullmatch(parts[-2]):
            continue
        if len(parts) == 3 and (parts[0].startswith(".") or parts[0] == "__MACOSX"):
            continue
        prefix = parts[0] + "/" if len(parts) == 3 else ""
        by_prefix.setdefault(prefix, set()).add(parts[-2])
    if not by_prefix:
        zf.close()
        return None
    prefix = "" if "" in by_prefix else sorted(by_prefix)[0]
    return _ZipTree(zf, archive, prefix), sorted(by_prefix[prefix], key=_run_number)


def _locate(path: Path) -> tuple[_Tree, list[str]]:
    """Find the runs at ``path`` (a zip, a folder holding all_runs.zip, or an extracted folder)."""
    if not path.exists():
        raise FewshotError(f"no such file or folder: {path}")
    found = None
    if path.is_file():
        found = _open_zip_runs(path)
    elif path.is_dir():
        runs = _runs_in_dir(path)
        if runs:
            found = _DirTree(path), runs
        else:
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                runs = _runs_in_dir(sub)
                if runs:
                    found = _DirTree(sub), runs
                    break
        if found is None and (path / ZIP_NAME).is_file():
            found = _open_zip_runs(path / ZIP_NAME)
    if found is None:
        raise FewshotError(f"no Omniglot one-shot runs (run01/{LABELS_FILE} …) found in {path}")
    return found


# -------------------------------------------------------------------- parsing one run
def _safe_rel(token: str) -> bool:
    p = PurePosixPath(token.replace("\\", "/"))
    return bool(token) and not p.is_absolute() and ".." not in p.parts and not (len(token) > 1 and token[1] == ":")


def _resolve(tree: _Tree, run: str, token: str, sub: str) -> str | None:
    """The relative path a label token refers to: as written (relative to the runs folder), else the
    same file name in ``run/sub`` (copes with a renamed run folder)."""
    rel = PurePosixPath(token.replace("\\", "/")).as_posix()
    if rel.startswith("./"):
        rel = rel[2:]
    if tree.is_file(rel):
        return rel
    alt = f"{run}/{sub}/{PurePosixPath(rel).name}"
    return alt if tree.is_file(alt) else None


def _parse_labels(tree: _Tree, run: str) -> list[tuple[int, str, str]]:
    """``[(line number, test token, training token)]`` from ``run/class_labels.txt``."""
    where = tree.label(f"{run}/{LABELS_FILE}")
    try:
        text = tree.read(f"{run}/{LABELS_FILE}").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FewshotError(f"{where} is not a text file") from None
    pairs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        toks = line.split()
        if len(toks) != 2:
            raise FewshotError(f"{run}: malformed line {i} in {where}: expected {_LINE_FORMAT}, "
                               f"got {line.strip()!r}")
        for t in toks:
            if not _safe_rel(t):
                raise FewshotError(f"{run}: unsafe path {t!r} on line {i} of {where}")
        pairs.append((i, toks[0], toks[1]))
    if not pairs:
        raise FewshotError(f"{run}: {where} lists no test images")
    return pairs


def _load(tree: _Tree, rel: str, pre: Preprocess) -> torch.Tensor:
    return load_image(tree.read(rel), pre, name=tree.label(rel))


def _load_run(tree: _Tree, run: str, pre: Preprocess) -> LakeRun:
    where = tree.label(f"{run}/{LABELS_FILE}")
    train_names = sorted(f"{run}/training/{n}" for n in tree.files_in(f"{run}/training")
                         if is_image_file(n) and not n.startswith("."))
    if not train_names:
        raise FewshotError(f"{run}: no training images in {tree.label(run + '/training')}")
    index = {n: c for c, n in enumerate(train_names)}

    items = []
    seen = set()
    for line, test_tok, train_tok in _parse_labels(tree, run):
        test_rel = _resolve(tree, run, test_tok, "test")
        if test_rel is None:
            raise FewshotError(f"{run}: line {line} of {where} references missing image {test_tok}")
        train_rel = _resolve(tree, run, train_tok, "training")
        if train_rel is None:
            raise FewshotError(f"{run}: line {line} of {where} references missing image {train_tok}")
        if train_rel not in index:
            raise FewshotError(f"{run}: line {line} of {where}: {train_tok} is not one of the images in "
                               f"{run}/training")
        if test_rel in seen:
            raise FewshotError(f"{run}: line {line} of {where} lists test image {test_tok} a second time")
        seen.add(test_rel)
        items.append((test_rel, index[train_rel]))
    items.sort(key=lambda t: t[0])

    train = torch.stack([_load(tree, n, pre) for n in train_names])
    test = torch.stack([_load(tree, n, pre) for n, _ in items])
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return LakeRun(name=run, train=train, test=test, labels=labels,
                   test_names=[n for n, _ in items], train_names=train_names)


def load_lake_runs(path: str | os.PathLike, preprocess: Preprocess) -> list[LakeRun]:
    """Load every one-shot run found at ``path``, in run order.

    ``path`` may be ``all_runs.zip``, a folder holding it, or the extracted folder (with ``run01`` ...
    directly in it or one folder down). Zip members with ``..`` or absolute names are refused.

    Raises:
        FewshotError: no runs found, a malformed ``class_labels.txt`` line (names the run and line), a
            label referencing a missing image, or an unreadable image.
    """
    tree, runs = _locate(Path(path))
    try:
        return [_load_run(tree, r, preprocess) for r in runs]
    finally:
        if isinstance(tree, _ZipTree):
            tree.zf.close()
