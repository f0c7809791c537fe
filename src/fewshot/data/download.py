"""Fetching a published archive once, checked against its checksum (for users with internet; never in tests)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from ..errors import FewshotError


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_checked(url: str, dest: str | os.PathLike, algorithm: str, digest: str, timeout: float = 20.0) -> Path:
    """Download ``url`` to ``dest`` (no-op when ``dest`` exists) through a ``.part`` file, check its
    ``algorithm`` digest, then rename it into place. Fails with one line saying where to put the file when
    there is no network, or that the download is corrupt."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FewshotError(f"cannot download {url} ({getattr(e, 'reason', e)}); without internet, put "
                           f"{dest.name} into {dest.parent} and pass --data {dest.parent} or set FEWSHOT_DATA"
                           ) from None
    if file_digest(tmp, algorithm) != digest:
        tmp.unlink(missing_ok=True)
        raise FewshotError(f"checksum mismatch for {url}: the download is corrupt or the file changed")
    os.replace(tmp, dest)
    return dest


def extract_tar(archive: str | os.PathLike, into: str | os.PathLike) -> None:
    """Extract a (possibly compressed) tar archive into ``into``, refusing members that would land outside it
    (absolute paths, ``..``, links)."""
    into = Path(into)
    try:
        with tarfile.open(archive, "r:*") as tf:
            tf.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise FewshotError(f"cannot extract {archive}: {e.__class__.__name__}: {e}") from None
