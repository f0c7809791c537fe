"""Reading zip archives without trusting them: member names with ``..`` or absolute paths are refused."""
from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from ..errors import FewshotError


def check_member(name: str, archive: str | Path = "") -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise FewshotError(f"refusing unsafe path {name!r} in zip {archive}")


def open_zip(path: str | Path) -> zipfile.ZipFile:
    """Open a zip and check every member name; a broken archive is a one-line error."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise FewshotError(f"no such file: {path}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise FewshotError(f"cannot read zip {path}: {e}") from None
    for n in zf.namelist():
        check_member(n, path)
    return zf
