"""Images whose class is not their folder: a label sheet (``--labels FILE.csv``) or a pattern on file names
(``--label-pattern REGEX``).

Many real collections are one flat folder (COIL-100's ``obj12__35.png``) or come with a spreadsheet of labels.
:func:`labeled_folder` reads either:

* a **label sheet**: a CSV of ``path,label`` rows, paths relative to the data folder (absolute paths work
  too); further columns are ignored. A header row is optional: a first row whose path is not an image file
  name (``filename,label``, ``path,class``) is taken for one.
* a **label pattern**: a regular expression searched in the name of every image directly in the folder; the
  class is what its first group matched (``obj(\\d+)__\\d+\\.png`` -> class ``12``). Anchor it (``^…$``) to
  match whole names.

Classes are sorted by name, numbers in names compared as numbers (``obj2`` before ``obj10``); a sheet keeps
its own order of images within a class, a pattern sorts them by file name the same way. The helpers that
read sheets (:func:`read_sheet`) and decode lists of files into one dataset (:func:`decode_classes`) serve
the mini-ImageNet CSV layout too.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import FewshotError
from .dataset import ClassDataset
from .folder import cached_files, files_digest, scan_files
from .images import Preprocess, as_size, is_image_file, load_image


def natural_key(name: str) -> tuple:
    """Sort key comparing runs of digits as numbers: ``obj2`` < ``obj10``."""
    return tuple((0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


# ------------------------------------------------------------------------------------------ label sheets
def read_sheet(path: str | os.PathLike, what: str = "label sheet") -> list:
    """The ``(row number, path, label)`` entries of a CSV of ``path,label`` rows (1-based row numbers as a
    spreadsheet shows them). Blank rows are skipped; a first row whose path is not an image file name is a
    header.

    Raises:
        FewshotError: the file is missing or unreadable, a row has fewer than two fields or an empty path or
            label, or the sheet lists nothing (each message names the file and row).
    """
    path = Path(path)
    if not path.is_file():
        raise FewshotError(f"no such {what}: {path}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for i, row in enumerate(csv.reader(fh), start=1):
                cells = [c.strip() for c in row]
                if not any(cells):
                    continue
                if not rows and i == 1 and not is_image_file(cells[0]):
                    continue                                    # a header such as "filename,label"
                if len(cells) < 2 or not cells[0] or not cells[1]:
                    raise FewshotError(f"{path}, row {i}: expected path,label, got {','.join(row)!r}")
                rows.append((i, cells[0], cells[1]))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FewshotError(f"cannot read {what} {path}: {e.__class__.__name__}: {e}") from None
    if not rows:
        raise FewshotError(f"{what} {path} lists no images (expected path,label rows)")
    return rows


def resolve_rows(rows: Sequence[tuple], sheet: Path, bases: Sequence[Path]) -> list:
    """``(row, Path, label)`` for each sheet entry, its path found under the first of ``bases`` holding it.

    Raises:
        FewshotError: a listed file exists under none of ``bases``, or one file is listed twice (naming the
            sheet, the row and the file).
    """
    out, seen = [], {}
    for i, name, label in rows:
        for base in bases:
            p = base / name
            if p.is_file():
                break
        else:
            where = " or ".join(str(b) for b in bases)
            raise FewshotError(f"{sheet}, row {i}: image {name} not found in {where}")
        key = os.path.normcase(os.path.abspath(p))
        if key in seen:
            raise FewshotError(f"{sheet}, row {i}: {name} is already listed in row {seen[key]}")
        seen[key] = i
        out.append((i, p, label))
    return out


def group_by_label(entries: Sequence[tuple]) -> list:
    """``[(label, [paths])]`` from ``(row, path, label)`` entries, labels in natural order, paths in the
    entries' order."""
    by = {}
    for _, p, label in entries:
        by.setdefault(label, []).append(p)
    return [(label, by[label]) for label in sorted(by, key=natural_key)]


# ------------------------------------------------------------------------------------------ label patterns
def compile_pattern(pattern: str) -> re.Pattern:
    """``pattern`` compiled; a one-line error naming ``--label-pattern`` when it is invalid or has no group."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise FewshotError(f"--label-pattern '{pattern}' is not a valid regular expression: {e}") from None
    if rx.groups < 1:
        raise FewshotError(f"--label-pattern '{pattern}' has no group: put the part of the file name that "
                           "names the class in parentheses, e.g. obj(\\d+)__\\d+\\.png")
    return rx


def pattern_classes(root: Path, pattern: str) -> list:
    """``[(class, [(path, size, mtime_ns)])]`` for the images directly in ``root``, the class being the first
    group of ``pattern`` matched in each file name.

    Raises:
        FewshotError: the pattern is invalid or has no group, the folder has no images, or some images do not
            match (saying how many and naming the first).
    """
    rx = compile_pattern(pattern)
    files = scan_files(root)
    if not files:
        raise FewshotError(f"no images directly in {root} to label with --label-pattern")
    by, unmatched = {}, []
    for f in files:
        m = rx.search(f[0].name)
        label = m.group(1) if m else None
        if not label:
            unmatched.append(f[0].name)
            continue
        by.setdefault(label, []).append(f)
    if unmatched:
        first = sorted(unmatched, key=natural_key)[0]
        raise FewshotError(f"{len(unmatched)} of {len(files)} images in {root} do not match --label-pattern "
                           f"'{pattern}' (or its first group is empty); the first is {first}")
    return [(label, sorted(by[label], key=lambda f: natural_key(f[0].name))) for label in sorted(by, key=natural_key)]


# ------------------------------------------------------------------------------------------ decoding
def decode_classes(classes: Sequence[tuple], pre: Preprocess, groups: Optional[Sequence[str]] = None,
                   source: str = "") -> ClassDataset:
    """Decode ``[(class name, [paths])]`` into one :class:`ClassDataset`, writing every image straight into
    the final tensor (no second copy of the data set in memory). An unreadable file names itself."""
    total = sum(len(paths) for _, paths in classes)
    h, w = pre.size
    data = torch.empty(total, pre.channels, h, w, dtype=torch.uint8)
    i = 0
    for _, paths in classes:
        for p in paths:
            data[i] = load_image(p, pre)
            i += 1
    return ClassDataset(data, [len(paths) for _, paths in classes], [n for n, _ in classes], groups, pre,
                        source=source)


def _stat(paths: Sequence[Path]) -> list:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p, st.st_size, st.st_mtime_ns))
    return out


def labeled_folder(root: str | os.PathLike, labels: str | os.PathLike | None = None,
                   pattern: Optional[str] = None, size: int | Sequence[int] = 28, channels: int = 1,
                   invert: bool = False, cache: str | os.PathLike | bool | None = None) -> ClassDataset:
    """Load the images of ``root`` labelled by a sheet (``labels``) or by a file-name ``pattern`` (exactly
    one of the two; see the module docstring).

    Args:
        root: the data folder (the sheet's paths are relative to it; the pattern labels the images directly
            in it).
        labels: CSV of ``path,label`` rows.
        pattern: regular expression whose first group is the class.
        size, channels, invert: as for :func:`fewshot.data.image_folder`.
        cache: see :func:`fewshot.data.dataset.cached`; any added, removed or changed image or sheet
            invalidates it.

    Raises:
        FewshotError: naming the flag, the sheet row or the file at fault.
    """
    root = Path(root)
    if (labels is None) == (pattern is None):
        raise FewshotError("give either --labels FILE.csv or --label-pattern REGEX, not "
                           + ("both" if labels is not None else "neither"))
    if not root.is_dir():
        raise FewshotError(f"--data {root} must be a folder for --labels/--label-pattern")
    if channels not in (1, 3):
        raise FewshotError(f"channels must be 1 or 3, got {channels}")
    pre = Preprocess(size=as_size(size), channels=int(channels), invert=bool(invert))
    if labels is not None:
        sheet = Path(labels)
        entries = resolve_rows(read_sheet(sheet, "label sheet (--labels)"), sheet, [root])
        classes = [(name, _stat(paths)) for name, paths in group_by_label(entries)]
        sources, described = [root, sheet], f"{root} labelled by {sheet.name}"
    else:
        classes = pattern_classes(root, pattern)
        sources, described = [root], f"{root} labelled by /{pattern}/"

    def build() -> ClassDataset:
        return decode_classes([(n, [p for p, _, _ in files]) for n, files in classes], pre,
                              source=f"image folder {described}")

    params = {"pre": pre.to_dict(), "files": files_digest(classes), "pattern": pattern}
    return cached_files(root, sources, params, build, "labeled", cache)

