"""Reading zip archives without trusting them: member names with ``..`` or absolute paths are refused, and
a member is read only up to a bound (:func:`read_member`), so a small archive cannot expand into gigabytes
of memory (a zip bomb) whatever sizes its headers declare.
"""
from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from ..errors import FewshotError

#: the most bytes one member may expand to (the largest published image in the data sets read from zips,
#: an Omniglot PNG or a Lake run file, is a few kilobytes)
MAX_MEMBER_BYTES = 64 << 20
#: the highest expansion ratio accepted for members above :data:`RATIO_FLOOR_BYTES`; images are stored
#: compressed already (PNG, JPEG: ratios near 1), while deflate turns a run of zeros into about 1/1000
MAX_RATIO = 100
#: members smaller than this are not judged by ratio (a tiny blank bitmap or text file may compress well)
RATIO_FLOOR_BYTES = 1 << 20
#: bytes inflated per read: what a member can cost beyond its accepted size
READ_BLOCK = 1 << 16


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


def read_member(zf: zipfile.ZipFile, name: str, archive: str | Path = "",
                max_bytes: int | None = None, max_ratio: float | None = None) -> bytes:
    """The bytes of member ``name``, refused (one-line error naming ``archive:name``) when its declared size
    is over ``max_bytes`` (default :data:`MAX_MEMBER_BYTES`), its declared expansion ratio is over
    ``max_ratio`` (default :data:`MAX_RATIO`, judged above :data:`RATIO_FLOOR_BYTES`), or it expands past
    ``max_bytes`` while being read (headers can lie: it is inflated in blocks of :data:`READ_BLOCK` bytes,
    so no more than ``max_bytes`` plus one block is ever held).
    A corrupt member (bad CRC, broken deflate stream) is a one-line error too."""
    limit = MAX_MEMBER_BYTES if max_bytes is None else int(max_bytes)
    ratio_limit = MAX_RATIO if max_ratio is None else float(max_ratio)
    label = f"{archive}:{name}"
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FewshotError(f"no member {name!r} in zip {archive}") from None
    if info.file_size > limit:
        raise FewshotError(f"refusing {label}: it expands to {info.file_size} bytes, more than the "
                           f"{limit} allowed for one member")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_FLOOR_BYTES and ratio > ratio_limit:
        raise FewshotError(f"refusing {label}: it expands {ratio:.0f}-fold ({info.compress_size} -> "
                           f"{info.file_size} bytes), more than the {ratio_limit:g}-fold a real image does")
    data = bytearray()
    try:
        with zf.open(info) as fh:
            # small blocks: zipfile inflates as much as one read asks for before it cuts the output at the
            # declared size, so one big read of a lying member would still inflate it whole
            while block := fh.read(READ_BLOCK):
                if len(data) + len(block) > limit:
                    raise FewshotError(f"refusing {label}: it expands past the {limit} bytes allowed for one "
                                       f"member (its header declares {info.file_size})")
                data += block
    except FewshotError:
        raise
    except Exception as e:   # zlib.error, BadZipFile (CRC), EOFError, NotImplementedError (compression)
        raise FewshotError(f"cannot read {label}: {e.__class__.__name__}: {e}") from None
    return bytes(data)
