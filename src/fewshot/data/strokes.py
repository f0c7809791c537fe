"""Omniglot pen strokes: real human demonstrations of how each character is drawn.

The published stroke archives (``strokes_background.zip``, ``strokes_evaluation.zip``,
``strokes_background_small1/2.zip``, or their extracted folders) hold one text file per drawing,
``<Alphabet>/characterNN/<id>_<drawer>.txt``, the same names as the images: a ``START`` line, then ``x,y,t``
lines (motor coordinates, y up; t in ms), ``BREAK`` between strokes. macOS ``__MACOSX/`` and ``.DS_Store``
entries are skipped; a character found in two archives (Greek and Latin are in both small sets) is read once.

:func:`load_strokes` turns every drawing into a fixed-length pen trajectory: the strokes are joined in
drawing order (the pen-up move from one stroke's end to the next stroke's start is part of the path), the
path is resampled to ``points`` positions equally spaced along its length, and coordinates are mapped to
[-1, 1] by the 105x105 drawing canvas (x / 52.5 - 1, -y / 52.5 - 1 for image y = -motor y). A character is
then a ``[drawers, points, 2]`` tensor: the same task demonstrated by each of its (usually 20) drawers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from ..errors import FewshotError
from .safezip import open_zip, read_member

STROKE_ARCHIVES = ("strokes_background", "strokes_evaluation", "strokes_background_small1",
                   "strokes_background_small2")
CANVAS = 105.0
_NAME = re.compile(r"(?:^|/)([^/]+)/(character\d+)/(\d+_\d+)\.txt$")


@dataclass
class StrokeSet:
    """Every character's drawings: ``trajectories[i]`` ``[drawers_i, points, 2]`` for ``names[i]``
    (``Alphabet/characterNN``), whose alphabet is ``groups[i]``."""
    names: List[str]
    groups: List[str]
    trajectories: List[torch.Tensor]
    points: int

    def __len__(self) -> int:
        return len(self.names)

    def select(self, groups=None, exclude=None) -> "StrokeSet":
        """The characters of the alphabets in ``groups`` (or of all but ``exclude``)."""
        keep = [i for i, g in enumerate(self.groups)
                if (groups is None or g in groups) and (exclude is None or g not in exclude)]
        if not keep:
            raise FewshotError(f"no characters in alphabets {groups or 'other than ' + str(exclude)}")
        return StrokeSet([self.names[i] for i in keep], [self.groups[i] for i in keep],
                         [self.trajectories[i] for i in keep], self.points)


def parse_drawing(text: str, source: str = "") -> List[torch.Tensor]:
    """The strokes of one drawing file: a list of ``[n, 2]`` motor-coordinate tensors."""
    strokes, cur = [], []
    for i, line in enumerate(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        if line in ("START", "BREAK"):
            if cur:
                strokes.append(torch.tensor(cur, dtype=torch.float64))
            cur = []
            continue
        parts = line.split(",")
        try:
            cur.append([float(parts[0]), float(parts[1])])
        except (ValueError, IndexError):
            raise FewshotError(f"{source}, line {i + 1}: expected x,y,t, got {line[:40]!r}") from None
    if cur:
        strokes.append(torch.tensor(cur, dtype=torch.float64))
    if not strokes:
        raise FewshotError(f"{source} holds no pen positions")
    return strokes


def resample(strokes: List[torch.Tensor], points: int) -> torch.Tensor:
    """``points`` positions equally spaced along the joined path of ``strokes``, in [-1, 1] canvas units."""
    path = torch.cat(strokes)
    xy = torch.stack([path[:, 0] / (CANVAS / 2) - 1, -path[:, 1] / (CANVAS / 2) - 1], 1)
    seg = (xy[1:] - xy[:-1]).norm(dim=1)
    s = torch.cat([torch.zeros(1, dtype=xy.dtype), seg.cumsum(0)])
    if float(s[-1]) == 0.0:                   # a single dot
        return xy[:1].expand(points, 2).float().clone()
    target = torch.linspace(0, float(s[-1]), points, dtype=xy.dtype)
    j = torch.searchsorted(s, target, right=True).clamp(1, len(s) - 1)
    s0, s1 = s[j - 1], s[j]
    w = ((target - s0) / (s1 - s0).clamp(min=1e-12)).unsqueeze(1)
    return ((1 - w) * xy[j - 1] + w * xy[j]).float()


def _files(root: Path) -> Dict[str, callable]:
    """``{Alphabet/characterNN/id_drawer: reader}`` over every stroke archive or folder under ``root``."""
    found: Dict[str, callable] = {}
    for name in STROKE_ARCHIVES:
        z, d = root / f"{name}.zip", root / name
        if d.is_dir():
            for f in sorted(d.rglob("*.txt")):
                m = _NAME.search(f.as_posix())
                if m and "__MACOSX" not in f.parts:
                    found.setdefault("/".join(m.groups()), lambda f=f: f.read_text())
        elif z.is_file():
            zf = open_zip(z)
            for member in sorted(zf.namelist()):
                m = _NAME.search(member)
                if m and "__MACOSX" not in member:
                    found.setdefault("/".join(m.groups()),
                                     lambda zf=zf, member=member, z=z: read_member(zf, member, z).decode())
    return found


def load_strokes(root, points: int = 50) -> StrokeSet:
    """Every drawing under ``root`` (stroke zips or their folders) as resampled trajectories (see the
    module docstring)."""
    root = Path(root)
    if int(points) < 2:
        raise FewshotError(f"points must be at least 2, got {points}")
    if not root.is_dir():
        raise FewshotError(f"no such folder: {root}")
    files = _files(root)
    if not files:
        raise FewshotError(f"{root} holds no Omniglot stroke archives ({', '.join(a + '.zip' for a in STROKE_ARCHIVES)})")
    by_char: Dict[str, list] = {}
    for key in sorted(files):
        alphabet, char, _ = key.split("/")
        traj = resample(parse_drawing(files[key](), f"{root}/{key}.txt"), int(points))
        by_char.setdefault(f"{alphabet}/{char}", []).append(traj)
    names = sorted(by_char)
    return StrokeSet(names, [n.split("/")[0] for n in names], [torch.stack(by_char[n]) for n in names],
                     int(points))


def trajectory_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean distance between time-aligned trajectories ``[..., T, 2]`` (in canvas units of [-1, 1])."""
    return (a - b).norm(dim=-1).mean(-1)
