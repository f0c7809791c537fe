"""CUB-200-2011 (Wah, Branson, Welinder, Perona & Belongie 2011): 11 788 photographs of 200 bird species, in
the layout of the official ``CUB_200_2011.tgz``:

* ``CUB_200_2011/images/<class folder>/<file>.jpg`` (class folders ``001.Black_footed_Albatross`` ...),
* ``images.txt`` (``<image id> <path under images/>``), ``image_class_labels.txt`` (``<image id> <class
  id>``), ``classes.txt`` (``<class id> <class folder>``), and optionally ``bounding_boxes.txt`` (``<image
  id> <x> <y> <width> <height>``, pixels).

``cub(root)`` reads the extracted ``CUB_200_2011/`` folder, a folder holding it, or the ``.tgz`` itself
(read in two passes, never extracted to disk). Classes are the class folder names in class-id order; each
class's group is its part of the few-shot split of Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot
Classification" (ICLR 2019), shipped with the package (``data/splits/cub/{train,val,test}.txt``: 100 / 50 /
50 classes; in their ``filelists/CUB/write_CUB_filelist.py`` the class with index ``i`` in the sorted class
folders is a base (train) class when ``i % 2 == 0``, validation when ``i % 4 == 1``, novel (test) when
``i % 4 == 3``). So ``--split auto`` / ``--split published`` use that split, as for mini-ImageNet; a class
outside the shipped lists gets the group ``"other"`` (and then ``auto`` falls back to a random split).

Images are RGB (the few grey photographs are converted), resized to ``size`` (84 by default, the usual
few-shot resolution), optionally cropped to their bounding box first (``crop=True``). Decoded images are
cached (:func:`fewshot.data.dataset.cached`).
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image

from ..errors import FewshotError
from .dataset import ClassDataset, cached, env_data_root
from .images import Preprocess, as_size, convert

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
ARCHIVE = "CUB_200_2011.tgz"
FOLDER = "CUB_200_2011"
#: the MD5 of the official archive (as checked by torchvision-style CUB loaders)
MD5 = "97eceeb196236b17998738112f37df78"
TEXTS = ("images.txt", "image_class_labels.txt", "classes.txt")
BOXES = "bounding_boxes.txt"
SPLITS = ("train", "val", "test")
SPLITS_DIR = Path(__file__).with_name("splits") / "cub"
DEFAULT_SIZE = (84, 84)


# ------------------------------------------------------------------------------------------ finding the files
def find_source(root: str | os.PathLike) -> Path:
    """The ``CUB_200_2011/`` folder or ``.tgz`` to read for ``root``; a one-line error saying what is expected
    when there is none."""
    root = Path(root)
    if root.is_file():
        if root.name.endswith((".tgz", ".tar.gz", ".tar")):
            return root
        raise FewshotError(f"{root} is not the CUB-200-2011 archive ({ARCHIVE})")
    if not root.is_dir():
        raise FewshotError(f"no such file or folder: {root}")
    for cand in (root, root / FOLDER):
        if all((cand / t).is_file() for t in TEXTS) and (cand / "images").is_dir():
            return cand
    if (root / ARCHIVE).is_file():
        return root / ARCHIVE
    raise FewshotError(f"no CUB-200-2011 in {root}: expected {FOLDER}/ with images/, {', '.join(TEXTS)}, or "
                       f"{ARCHIVE} (download it from {URL})")


def is_cub(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or directly holds) CUB-200-2011 in the official layout."""
    p = Path(path)
    if p.is_file():
        return p.name == ARCHIVE
    try:
        find_source(p)
        return True
    except FewshotError:
        return False


def default_root() -> Path:
    """``FEWSHOT_DATA`` (or its ``cub``, ``CUB_200_2011``, ``cub-200-2011`` or ``CUB`` subfolder)."""
    return env_data_root("CUB-200-2011", ("cub", FOLDER, "cub-200-2011", "CUB"))


# ------------------------------------------------------------------------------------------ the text files
def _rows(text: str, name: str, fields: int) -> List[List[str]]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, fields - 1) if fields == 2 else line.split()
        if len(parts) != fields:
            raise FewshotError(f"{name} line {i}: expected {fields} fields, got {line.strip()!r}")
        out.append(parts)
    return out


def parse_texts(texts: Dict[str, str], crop: bool, where: str) -> tuple:
    """From the text files: (class names in id order, [(class index, relative path, box or None)] in class
    order then image id)."""
    try:
        classes = {int(c): n.strip() for c, n in _rows(texts["classes.txt"], f"{where}/classes.txt", 2)}
        paths = {int(i): p.strip() for i, p in _rows(texts["images.txt"], f"{where}/images.txt", 2)}
        labels = {int(i): int(c) for i, c in _rows(texts["image_class_labels.txt"],
                                                  f"{where}/image_class_labels.txt", 2)}
        boxes = {}
        if crop:
            for r in _rows(texts[BOXES], f"{where}/{BOXES}", 5):
                boxes[int(r[0])] = tuple(float(v) for v in r[1:])
    except ValueError as e:
        raise FewshotError(f"{where}: a CUB text file has a field that is not a number ({e})") from None
    ids = sorted(classes)
    index = {c: k for k, c in enumerate(ids)}
    entries = []
    for i in sorted(paths):
        if i not in labels:
            raise FewshotError(f"{where}/image_class_labels.txt has no class for image {i} ({paths[i]})")
        if labels[i] not in index:
            raise FewshotError(f"{where}/image_class_labels.txt: image {i} has class {labels[i]}, which "
                               "classes.txt does not list")
        if crop and i not in boxes:
            raise FewshotError(f"{where}/{BOXES} has no box for image {i} ({paths[i]})")
        entries.append((index[labels[i]], paths[i], boxes.get(i)))
    entries.sort(key=lambda e: e[0])            # stable: image id order within a class
    return [classes[c] for c in ids], entries


# ------------------------------------------------------------------------------------------ the split
def split_lists() -> Tuple[list, list, list]:
    """The shipped (train, val, test) class folder names of Chen et al.'s split."""
    out = []
    for part in SPLITS:
        f = SPLITS_DIR / f"{part}.txt"
        out.append([ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")])
    return tuple(out)


def split_groups(names: Sequence[str]) -> list:
    """The split name of each class (``"other"`` for a class outside the shipped lists)."""
    where = {n: part for part, lst in zip(SPLITS, split_lists()) for n in lst}
    return [where.get(n, "other") for n in names]


# ------------------------------------------------------------------------------------------ decoding
def _decode(raw, pre: Preprocess, box, name: str) -> torch.Tensor:
    try:
        img = Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw)
        img.load()
        if box is not None:
            x, y, w, h = box
            img = img.crop((int(x), int(y), int(round(x + w)), int(round(y + h))))
        return convert(img, pre)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FewshotError(f"cannot read image {name}: {e.__class__.__name__}: {e}") from None


def _build(source: Path, pre: Preprocess, crop: bool) -> ClassDataset:
    h, w = pre.size
    if source.is_dir():
        texts = {t: (source / t).read_text() for t in TEXTS}
        if crop:
            if not (source / BOXES).is_file():
                raise FewshotError(f"crop=True needs {source / BOXES}")
            texts[BOXES] = (source / BOXES).read_text()
        names, entries = parse_texts(texts, crop, str(source))
        data = torch.empty(len(entries), pre.channels, h, w, dtype=torch.uint8)
        for k, (_, rel, box) in enumerate(entries):
            f = source / "images" / rel
            if not f.is_file():
                raise FewshotError(f"{source}/images.txt lists {rel}, which is not in {source / 'images'}")
            data[k] = _decode(f, pre, box, str(f))
    else:
        names, entries, data = _build_archive(source, pre, crop)
    counts = [0] * len(names)
    for c, _, _ in entries:
        counts[c] += 1
    keep = [c for c in range(len(names)) if counts[c]]       # a class with no images is left out
    names = [names[c] for c in keep]
    return ClassDataset(data, [counts[c] for c in keep], names, split_groups(names), pre,
                        source=f"cub:{source.name}")


def _build_archive(archive: Path, pre: Preprocess, crop: bool) -> tuple:
    """Two passes over the archive: the text files, then every listed image decoded into its row."""
    want = set(TEXTS) | ({BOXES} if crop else set())
    texts: Dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                base = m.name.rstrip("/").split("/")[-1]
                if m.isfile() and base in want and m.name.count("/") <= 1 and base not in texts:
                    texts[base] = tf.extractfile(m).read().decode("utf-8")
        missing = sorted(want - set(texts))
        if missing:
            raise FewshotError(f"{archive} lacks {', '.join(missing)}")
        names, entries = parse_texts(texts, crop, str(archive))
        row = {rel: k for k, (_, rel, _) in enumerate(entries)}
        h, w = pre.size
        data = torch.empty(len(entries), pre.channels, h, w, dtype=torch.uint8)
        seen = set()
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                if not m.isfile() or "/images/" not in "/" + m.name:
                    continue
                rel = m.name.split("images/", 1)[1]
                k = row.get(rel)
                if k is None or k in seen:
                    continue
                data[k] = _decode(tf.extractfile(m).read(), pre, entries[k][2], f"{archive}:{m.name}")
                seen.add(k)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FewshotError(f"cannot read {archive}: {e.__class__.__name__}: {e}") from None
    if len(seen) != len(entries):
        lost = next(rel for rel, k in row.items() if k not in seen)
        raise FewshotError(f"{archive}: images.txt lists images/{lost} but the archive has no such image "
                           f"({len(entries) - len(seen)} missing)")
    return names, entries, data


def cub(root: str | os.PathLike | None = None, size: int | Sequence[int] = DEFAULT_SIZE, crop: bool = False,
        cache: str | os.PathLike | bool | None = None, download: bool = False) -> ClassDataset:
    """Load CUB-200-2011 (see the module docstring): 200 classes of RGB images, group = Chen et al.'s split.

    Args:
        root: the ``CUB_200_2011/`` folder, a folder holding it, or ``CUB_200_2011.tgz``; defaults to
            ``$FEWSHOT_DATA`` (:func:`default_root`).
        size: output size (int or (h, w)).
        crop: crop every image to its box from ``bounding_boxes.txt`` before resizing.
        cache: see :func:`fewshot.data.dataset.cached`; ``False`` disables caching.
        download: fetch the official archive (MD5-checked) into ``root`` first when it is missing.

    Raises:
        FewshotError: missing files, malformed text files, a listed image that is absent or unreadable.
    """
    root = Path(root) if root is not None else default_root()
    if download and not is_cub(root):
        download_cub(root)
    source = find_source(root)
    pre = Preprocess(size=as_size(size), channels=3, invert=False)
    params = {"pre": pre.to_dict(), "crop": bool(crop)}
    if source.is_file():
        sources = [source]
    else:
        sources = [source / t for t in TEXTS] + [source / "images"]
        if crop and (source / BOXES).is_file():
            sources.append(source / BOXES)
    return cached(sources, params, lambda: _build(source, pre, crop), tag="cub", cache=cache)


def download_cub(root: str | os.PathLike, timeout: float = 60.0, extract: bool = True) -> Path:
    """Fetch the official ``CUB_200_2011.tgz`` into ``root`` (no-op when present), checking its MD5, and
    extract it there (``extract=False`` keeps only the archive, which :func:`cub` reads as it is)."""
    from .download import extract_tar, fetch_checked
    root = Path(root)
    archive = fetch_checked(URL, root / ARCHIVE, "md5", MD5, timeout=timeout)
    if extract and not (root / FOLDER / "images.txt").is_file():
        extract_tar(archive, root)
    return root / FOLDER if extract else archive
