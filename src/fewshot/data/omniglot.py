"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015) from the official zips or their extracted folders.

``omniglot(root)`` accepts a folder holding any of the official archives (``images_background.zip``,
``images_evaluation.zip``, ``images_background_small1.zip``, ``images_background_small2.zip``), their
extracted folders, or one archive / extracted folder itself. The two small background sets share Greek and
Latin: each character is loaded once. Images are grey, inverted so strokes are 1 (255 as uint8), resized.
The group of each class is its alphabet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import FewshotError
from .dataset import ClassDataset, cached, env_data_root
from .download import fetch_checked
from .images import Preprocess, as_size, is_image_file, load_image
from .safezip import open_zip, read_member

BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
#: name -> (relative URL, (hash algorithm, digest)) of the files as published in the official repository.
#: SHA-256 values agree with TensorFlow Datasets' checksum list for Omniglot; all_runs.zip has only a
#: published MD5 (cited by several projects), which is what we check for it.
FILES = {
    "images_background": ("images_background.zip",
                          ("sha256", "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640")),
    "images_evaluation": ("images_evaluation.zip",
                          ("sha256", "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee")),
    "images_background_small1": ("images_background_small1.zip",
                                 ("sha256", "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4")),
    "images_background_small2": ("images_background_small2.zip",
                                 ("sha256", "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f")),
    "all_runs": ("one-shot-classification/all_runs.zip", ("md5", "e8996daecdf12afeeb4a53a179f06b19")),
}
#: Which sets make each split. "auto" takes every set found.
SPLITS = {
    "background": ["images_background"],
    "evaluation": ["images_evaluation"],
    "small": ["images_background_small1", "images_background_small2"],
    "small1": ["images_background_small1"],
    "small2": ["images_background_small2"],
    "all": ["images_background", "images_evaluation"],
}
DEFAULT_SIZE = 28


def _find_sets(root: Path) -> dict:
    """Set name -> path (zip file or extracted folder) found at ``root``."""
    found = {}
    if root.is_file():
        stem = root.name[:-4] if root.name.endswith(".zip") else root.name
        found[stem] = root
        return found
    if not root.is_dir():
        raise FewshotError(f"no such file or folder: {root} (set --data PATH or FEWSHOT_DATA)")
    for name in FILES:
        if name == "all_runs":
            continue
        d, z = root / name, root / (name + ".zip")
        if d.is_dir():
            found[name] = d
        elif z.is_file():
            found[name] = z
    if not found and root.name in FILES:
        found[root.name] = root
    if not found:
        # an extracted set under another name: <root>/<Alphabet>/<character>/*.png
        alph = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if alph and any(q.is_dir() for q in alph[0].iterdir()):
            found[root.name] = root
    return found


def _entries(source: Path) -> list:
    """[(alphabet, character, filename, reader)] for one set (zip or folder)."""
    out = []
    if source.is_file():
        zf = open_zip(source)
        for n in zf.namelist():
            parts = n.strip("/").split("/")
            if n.endswith("/") or not is_image_file(n) or len(parts) < 3:
                continue
            alpha, char, fn = parts[-3], parts[-2], parts[-1]
            out.append((alpha, char, fn, (lambda zf=zf, n=n: read_member(zf, n, source)), f"{source}:{n}"))
    else:
        for alpha in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for char in sorted(p for p in alpha.iterdir() if p.is_dir() and not p.name.startswith(".")):
                files = [f for f in sorted(char.iterdir()) if is_image_file(f.name)]
                if not files:
                    raise FewshotError(f"class folder {char} has no images")
                for f in files:
                    out.append((alpha.name, char.name, f.name, (lambda f=f: f.read_bytes()), str(f)))
    if not out:
        raise FewshotError(f"no Omniglot images (<alphabet>/<character>/*.png) in {source}")
    return out


def _build(sources: Sequence[Path], pre: Preprocess) -> ClassDataset:
    chars: dict = {}
    for src in sources:
        for alpha, char, fn, read, label in _entries(src):
            key = (alpha, char)
            files = chars.setdefault(key, {})
            if fn not in files:  # the small sets share alphabets: keep one copy of each image
                files[fn] = (read, label)
    names, groups, images = [], [], []
    for (alpha, char) in sorted(chars):
        files = chars[(alpha, char)]
        imgs = [load_image(files[fn][0](), pre, name=files[fn][1]) for fn in sorted(files)]
        images.append(torch.stack(imgs))
        names.append(f"{alpha}/{char}")
        groups.append(alpha)
    src = "omniglot:" + "+".join(s.name for s in sources)
    return ClassDataset.from_class_tensors(images, names, groups, pre, src)


def omniglot(root: str | os.PathLike | None = None, split: str = "auto", size=DEFAULT_SIZE,
             cache=None, download: bool = False) -> ClassDataset:
    """Load Omniglot as a :class:`ClassDataset` (grey, strokes bright, ``size`` pixels, group = alphabet).

    Args:
        root: folder with the official zips or extracted folders, or one of them. Defaults to
            ``$FEWSHOT_DATA/omniglot`` (or ``$FEWSHOT_DATA``).
        split: "auto" (every set found; the small sets are skipped when the full background set is there),
            "background", "evaluation", "all", "small", "small1", "small2".
        size: output size (int or (h, w)); 105 keeps the published resolution.
        download: fetch missing official files (with SHA-256 checks) into ``root`` first.
    """
    root = Path(root) if root is not None else default_root()
    pre = Preprocess(size=as_size(size), channels=1, invert=True)
    if download:
        for name in SPLITS.get(split, SPLITS["background"]):
            download_file(name, root)
    found = _find_sets(root)
    if split == "auto":
        names = [n for n in found]
        if "images_background" in names:
            names = [n for n in names if not n.startswith("images_background_small")]
    else:
        if split not in SPLITS:
            raise FewshotError(f"unknown Omniglot split {split!r}; choose from auto, {', '.join(SPLITS)}")
        names = SPLITS[split]
        missing = [n for n in names if n not in found]
        if missing:
            raise FewshotError(f"Omniglot set {missing[0]} not found in {root}: put {FILES[missing[0]][0]} "
                               f"(or its extracted folder) there, or pass download=True with internet")
    if not names:
        raise FewshotError(f"no Omniglot files in {root}: expected any of "
                           f"{', '.join(f[0] for k, f in FILES.items() if k != 'all_runs')} or their folders")
    sources = [found[n] for n in sorted(names)]
    params = {"size": list(pre.size), "sets": sorted(names)}
    return cached(sources, params, lambda: _build(sources, pre), tag="omniglot", cache=cache)


def default_root() -> Path:
    """``FEWSHOT_DATA`` (or its ``omniglot`` subfolder)."""
    return env_data_root("Omniglot", ("omniglot",))


def download_file(name: str, root: str | os.PathLike, timeout: float = 20.0) -> Path:
    """Fetch one official Omniglot file into ``root`` (no-op when present), checking its checksum.

    With no network this fails fast with a message saying where to put the files.
    """
    if name not in FILES:
        raise FewshotError(f"unknown Omniglot file {name!r}; known: {', '.join(FILES)}")
    rel, digest = FILES[name]
    root = Path(root)
    dest = root / Path(rel).name
    if dest.is_file() or (root / name).is_dir():
        return dest
    return fetch_checked(BASE_URL + rel, dest, digest[0], digest[1], timeout=timeout)
