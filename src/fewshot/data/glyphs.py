"""Glyphs: a built-in few-shot data set rendered from the TrueType fonts that ship with matplotlib.

Nothing is downloaded: every image is drawn on the fly from ``matplotlib/mpl-data/fonts/ttf`` and the
result is cached (in ``$FEWSHOT_CACHE`` or ``~/.cache/fewshot`` unless ``cache`` says otherwise).

Fonts used (:data:`FONT_PREFIXES`, 18 files): the 14 DejaVu files (Sans, Sans Mono and Serif in regular,
bold, oblique/italic and bold oblique/italic, plus the small Sans/Serif "Display" subsets) and the 4
STIXGeneral files (regular, bold, italic, bold italic). Their cmaps are proper Unicode maps, so a code point
means the same character in each of them. Left out: the Computer Modern ``cm*10`` fonts and the
``STIXSize*``/``STIXNonUni*`` fonts (their cmaps put unrelated symbols or private-use glyphs on ordinary
code points), and ``LastResortHE`` (it maps every code point to a generic placeholder for its block).

Classes: every Unicode code point drawn by at least ``min_fonts`` of those fonts, in code point order. A
font counts for a code point when its best cmap (fontTools) maps it to a real glyph and the rendered glyph
is not blank or near-empty. Whitespace, control, format, private-use, surrogate, unassigned and combining
code points (categories Zs Zl Zp Cc Cf Co Cs Cn Mn Me Mc) are never classes. A code point whose centred,
size-normalised glyphs equal those of an earlier class in most of the fonts they share is dropped too
(e.g. GREEK CAPITAL LETTER ALPHA after LATIN CAPITAL LETTER A, SUBSCRIPT ONE after DIGIT ONE, or braille
patterns that differ only in where their dots sit), so no two classes are indistinguishable. With the
defaults this leaves about 2 970 classes (the exact number depends slightly on the FreeType version).

Images: image ``j`` of a class is drawn with the ``j % n``-th of its ``n`` fonts (sorted by file name),
centred by its ink bounding box and fitted to 80% of the canvas, then moved by a random affine jitter
(rotation +-10 degrees, scale 0.85-1.1, shear +-0.15, shift +-10% kept inside the canvas) drawn from
``(seed, code point, j)`` only: equal seeds give bit-identical data, and ``max_classes`` or a smaller
``per_class`` give a prefix of the larger set. Drawing happens at twice the output size, then box-filtered
down. Output follows Omniglot after preprocessing: grey, one channel, strokes bright (255) on black (0).
The recorded :class:`Preprocess` has ``invert=True``, so raw black-on-white images of this kind are
inverted when loaded for prediction.

Class name: ``"U+0041 LATIN CAPITAL LETTER A"``. Group: the script or block word that starts the Unicode
name (``LATIN``, ``GREEK``, ``CYRILLIC``, ``BRAILLE``, ``BOX``, ``MATHEMATICAL``, ...; see
:data:`SCRIPT_WORDS`), else a word for the general category (``PUNCTUATION``, ``MATH``, ``CURRENCY``,
``SYMBOL``, ``LETTER``, ``NUMBER``).
"""
from __future__ import annotations

import math
import os
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import FewshotError
from .dataset import ClassDataset, cache_dir, cached
from .images import Preprocess, as_size

#: Bump when the rendering changes, so that old cache files are not reused.
GLYPHS_VERSION = 1
#: Font files (by name prefix) whose cmaps are reliable Unicode maps.
FONT_PREFIXES = ("DejaVu", "STIXGeneral")
#: Unicode general categories that never make a class.
EXCLUDED_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cs", "Cn", "Mn", "Me", "Mc"})
#: First words of Unicode names used as the group (script or block).
SCRIPT_WORDS = frozenset({
    "LATIN", "GREEK", "COPTIC", "CYRILLIC", "ARMENIAN", "HEBREW", "ARABIC", "SYRIAC", "THAANA", "NKO",
    "DEVANAGARI", "BENGALI", "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM",
    "SINHALA", "THAI", "LAO", "TIBETAN", "MYANMAR", "GEORGIAN", "HANGUL", "ETHIOPIC", "CHEROKEE", "CANADIAN",
    "OGHAM", "RUNIC", "KHMER", "MONGOLIAN", "TIFINAGH", "HIRAGANA", "KATAKANA", "BOPOMOFO", "CJK", "YI",
    "VAI", "GLAGOLITIC", "BRAILLE", "BOX", "MATHEMATICAL", "DOUBLE-STRUCK", "ROMAN", "MODIFIER",
    "SUPERSCRIPT", "SUBSCRIPT", "VULGAR", "CIRCLED", "APL", "MUSIC",
})
#: Group of code points whose name starts with no script word: by category, else its first letter.
CATEGORY_GROUPS = {"L": "LETTER", "N": "NUMBER", "P": "PUNCTUATION", "Sm": "MATH", "Sc": "CURRENCY",
                   "S": "SYMBOL"}

SUPERSAMPLE = 2          # draw at this multiple of the output size, then box-filter down
FIT = 0.8                # the glyph's ink box fills this fraction of the canvas (before jitter)
SELECT_PX = 64           # font size (pixels) at which code points are checked for ink and look-alikes
RENDER_SCALE = 1.15      # font size for drawing, relative to the supersampled canvas (at least SELECT_PX)
ROTATION_DEG = 10.0      # rotation drawn from +-ROTATION_DEG
SCALE_RANGE = (0.85, 1.1)
SHEAR = 0.15             # horizontal shear factor drawn from +-SHEAR (about +-8.5 degrees)
SHIFT = 0.10             # translation drawn from +-SHIFT of the canvas, limited so the glyph stays inside
MARGIN = 0.98            # the jittered glyph never extends beyond this fraction of the canvas
MIN_INK_FRACTION = 2e-3  # a glyph whose ink covers less than this fraction of the em square is near-empty
MIN_INK_EXTENT = 0.02    # ... as is one whose ink box is smaller than this fraction of the font size
SIGNATURE_SIZE = 16      # side of the normalised bitmap used to detect look-alike code points
DUPLICATE_SHARE = 0.75   # look-alike: identical signatures in at least this share of the shared fonts
_CHUNK = 32              # classes per unit of work when drawing with threads


def font_dir() -> Path:
    """Folder holding matplotlib's TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_files() -> list[Path]:
    """The font files used for glyphs (see :data:`FONT_PREFIXES`), sorted by name."""
    d = font_dir()
    if not d.is_dir():
        raise FewshotError(f"matplotlib's font folder {d} is missing; the glyphs data set needs it")
    files = sorted(p for p in d.glob("*.ttf") if p.name.startswith(FONT_PREFIXES))
    if not files:
        raise FewshotError(f"no DejaVu or STIXGeneral fonts in {d}; the glyphs data set needs them")
    return files


def font_coverage(files: Sequence[Path]) -> dict[int, list[int]]:
    """Code point -> indices (into ``files``) of the fonts whose best cmap maps it, for allowed categories."""
    from fontTools.ttLib import TTFont

    cover: dict = {}
    for i, f in enumerate(files):
        try:
            with TTFont(str(f), lazy=True) as font:
                cmap = font.getBestCmap() or {}
                glyph_order = set(font.getGlyphOrder())
        except Exception as e:  # fontTools raises many types for damaged files
            raise FewshotError(f"cannot read font {f}: {e.__class__.__name__}: {e}") from None
        for cp, glyph in cmap.items():
            if glyph == ".notdef" or glyph not in glyph_order:
                continue
            if unicodedata.category(chr(cp)) in EXCLUDED_CATEGORIES:
                continue
            cover.setdefault(cp, []).append(i)
    return cover


def class_name(cp: int) -> str:
    """``"U+0041 LATIN CAPITAL LETTER A"`` (just the hex form for unnamed code points)."""
    hexform = f"U+{cp:04X}"
    name = unicodedata.name(chr(cp), "")
    return f"{hexform} {name}" if name else hexform


def class_group(cp: int) -> str:
    """Script or block word of the code point's Unicode name, else a word for its general category."""
    name = unicodedata.name(chr(cp), "")
    word = name.split(" ", 1)[0] if name else ""
    if word in SCRIPT_WORDS:
        return word
    cat = unicodedata.category(chr(cp))
    return CATEGORY_GROUPS.get(cat, CATEGORY_GROUPS.get(cat[0], "OTHER"))


class _Fonts:
    """The glyph fonts loaded at one pixel size; draws single code points."""

    def __init__(self, files: Sequence[Path], px: int):
        self.px = px
        self.fonts = []
        for f in files:
            try:
                self.fonts.append(ImageFont.truetype(str(f), px, layout_engine=ImageFont.Layout.BASIC))
            except OSError as e:
                raise FewshotError(f"cannot load font {f}: {e}") from None

    def mask(self, cp: int, font: int) -> Optional[Image.Image]:
        """The glyph's ink cropped to its bounding box (mode "L"), or None when blank or near-empty."""
        f = self.fonts[font]
        ch = chr(cp)
        x0, y0, x1, y1 = f.getbbox(ch)
        if x1 <= x0 or y1 <= y0:
            return None
        pad = 2 + self.px // 16
        img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
        ImageDraw.Draw(img).text((pad - x0, pad - y0), ch, fill=255, font=f)
        box = img.getbbox()
        if box is None:
            return None
        img = img.crop(box)
        ink = sum(v * n for v, n in enumerate(img.histogram()) if n) / 255.0
        if ink < MIN_INK_FRACTION * self.px * self.px or max(img.size) < MIN_INK_EXTENT * self.px:
            return None
        return img


def _draw(mask: Image.Image, u: np.ndarray, out_size: tuple) -> np.ndarray:
    """Fit ``mask`` to the supersampled canvas, jitter it by five uniforms in [0, 1), reduce to ``out_size``."""
    h, w = out_size
    H, W = h * SUPERSAMPLE, w * SUPERSAMPLE
    bw, bh = mask.size
    angle = math.radians((2 * u[0] - 1) * ROTATION_DEG)
    scale = SCALE_RANGE[0] + u[1] * (SCALE_RANGE[1] - SCALE_RANGE[0])
    shear = (2 * u[2] - 1) * SHEAR
    s = FIT * min(W / bw, H / bh) * scale
    # forward map, offsets from the ink centre -> offsets from the canvas centre: A = s * R(angle) @ Shear
    c, sn = math.cos(angle), math.sin(angle)
    a11, a12 = s * c, s * (c * shear - sn)
    a21, a22 = s * sn, s * (sn * shear + c)
    # half extent of the transformed ink box; shrink when it would leave the canvas
    ext_x = (abs(a11) * bw + abs(a12) * bh) / 2
    ext_y = (abs(a21) * bw + abs(a22) * bh) / 2
    shrink = min(1.0, MARGIN * W / (2 * ext_x), MARGIN * H / (2 * ext_y))
    a11, a12, a21, a22 = a11 * shrink, a12 * shrink, a21 * shrink, a22 * shrink
    slack_x = max(0.0, MARGIN * W / 2 - ext_x * shrink)
    slack_y = max(0.0, MARGIN * H / 2 - ext_y * shrink)
    tx = min(slack_x, max(-slack_x, (2 * u[3] - 1) * SHIFT * W))
    ty = min(slack_y, max(-slack_y, (2 * u[4] - 1) * SHIFT * H))
    # PIL wants the inverse map: source = ink centre + A^-1 (canvas point - canvas centre - t)
    det = a11 * a22 - a12 * a21
    i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
    ox, oy = W / 2 + tx, H / 2 + ty
    cx, cy = bw / 2, bh / 2
    coeffs = (i11, i12, cx - i11 * ox - i12 * oy, i21, i22, cy - i21 * ox - i22 * oy)
    big = mask.transform((W, H), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)
    return np.frombuffer(big.reduce(SUPERSAMPLE).tobytes(), dtype=np.uint8).reshape(h, w)


def _signature(mask: Image.Image) -> tuple:
    """The glyph shrunk (aspect kept) into a small square and thresholded: equal for look-alike glyphs."""
    bw, bh = mask.size
    s = SIGNATURE_SIZE / max(bw, bh)
    w, h = max(1, round(bw * s)), max(1, round(bh * s))
    return w, h, mask.resize((w, h), Image.BOX).point(_BINARY).tobytes()


_BINARY = [0] * 128 + [255] * 128  # threshold lookup table for Image.point


def _uniforms(seed: int, cp: int, n: int) -> np.ndarray:
    """``[n, 5]`` uniforms in [0, 1) for the jitter; row ``j`` depends only on (seed, cp, j)."""
    rng = np.random.default_rng([int(seed < 0), abs(int(seed)), cp, GLYPHS_VERSION])
    return rng.random((n, 5))


def _select(files: Sequence[Path], min_fonts: int, max_classes: Optional[int]) -> list:
    """The classes in code point order: [(code point, [font index, ...], [mask at SELECT_PX, ...])]."""
    cover = font_coverage(files)
    fonts = _Fonts(files, SELECT_PX)
    seen: dict = {}       # (font, signature) -> accepted code points drawn like that
    accepted: dict = {}   # accepted code point -> its fonts
    chosen = []
    for cp in sorted(cover):
        if len(cover[cp]) < min_fonts:
            continue
        idx, masks = [], []
        for fi in cover[cp]:
            m = fonts.mask(cp, fi)
            if m is not None:
                idx.append(fi)
                masks.append(m)
        if len(idx) < min_fonts:
            continue
        sigs = {fi: _signature(m) for fi, m in zip(idx, masks)}
        if _looks_like_earlier(sigs, seen, accepted):
            continue
        for fi, sig in sigs.items():
            seen.setdefault((fi, sig), []).append(cp)
        accepted[cp] = set(idx)
        chosen.append((cp, idx, masks))
        if max_classes is not None and len(chosen) >= max_classes:
            break
    return chosen


def _looks_like_earlier(sigs: dict, seen: dict, accepted: dict) -> bool:
    """True when an accepted code point has the same signature in most of the fonts it shares with this one."""
    matches: dict = {}
    for fi, sig in sigs.items():
        for other in seen.get((fi, sig), ()):
            matches[other] = matches.get(other, 0) + 1
    return any(n >= DUPLICATE_SHARE * len(accepted[other].intersection(sigs)) for other, n in matches.items())


def _workers() -> int:
    """Threads to draw with: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _build(files: Sequence[Path], size: tuple, per_class: int, min_fonts: int, seed: int,
           max_classes: Optional[int]) -> ClassDataset:
    h, w = size
    chosen = _select(files, min_fonts, max_classes)
    if not chosen:
        raise FewshotError(f"no code point is drawn by {min_fonts} or more fonts; lower min_fonts")
    px = max(SELECT_PX, round(RENDER_SCALE * SUPERSAMPLE * max(h, w)))
    local = threading.local()  # FreeType faces are not shared between threads
    data = np.empty((len(chosen) * per_class, 1, h, w), dtype=np.uint8)

    def draw_chunk(first: int) -> None:
        for c in range(first, min(first + _CHUNK, len(chosen))):
            cp, idx, masks = chosen[c]
            if px != SELECT_PX:  # larger outputs: redraw the glyphs at a matching size
                if not hasattr(local, "fonts"):
                    local.fonts = _Fonts(files, px)
                redrawn = [local.fonts.mask(cp, fi) for fi in idx]
                masks = [m if r is None else r for m, r in zip(masks, redrawn)]
            u = _uniforms(seed, cp, per_class)
            for j in range(per_class):
                data[c * per_class + j, 0] = _draw(masks[j % len(masks)], u[j], (h, w))

    starts = range(0, len(chosen), _CHUNK)
    workers = min(_workers(), len(starts))
    if workers > 1:  # Pillow releases the GIL while resampling, so threads share the work
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(draw_chunk, starts))
    else:
        for first in starts:
            draw_chunk(first)
    names = [class_name(cp) for cp, _, _ in chosen]
    groups = [class_group(cp) for cp, _, _ in chosen]
    pre = Preprocess(size=(h, w), channels=1, invert=True)
    return ClassDataset(torch.from_numpy(data), [per_class] * len(chosen), names, groups, pre,
                        f"glyphs (matplotlib fonts, seed {seed})")


def _check_int(label: str, value, lowest: Optional[int]) -> int:
    """``value`` as an int, or a :class:`FewshotError` naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FewshotError(f"{label} must be an integer, got {value!r}")
    if lowest is not None and value < lowest:
        raise FewshotError(f"{label} must be at least {lowest}, got {value}")
    return int(value)


def glyphs(size=28, per_class: int = 20, min_fonts: int = 8, seed: int = 0, max_classes: Optional[int] = None,
           cache: str | os.PathLike | bool | None = None) -> ClassDataset:
    """The built-in glyphs data set: one class per Unicode character drawn by ``min_fonts`` matplotlib fonts.

    Args:
        size: output size, int or (height, width).
        per_class: images per class; image ``j`` uses the ``j % n``-th of the class's ``n`` fonts.
        min_fonts: fewest fonts that must draw a code point for it to become a class (at most 18).
        seed: seed of the affine jitter; equal seeds give bit-identical data.
        max_classes: keep only the first N classes (in code point order); None keeps all.
        cache: cache folder; None uses ``$FEWSHOT_CACHE`` or ``~/.cache/fewshot`` (never matplotlib's
            installed font folder); False always renders.

    Returns:
        A :class:`ClassDataset` of grey uint8 images with bright strokes on black, grouped by script.
    """
    hw = as_size(size)
    per_class = _check_int("per_class", per_class, 1)
    min_fonts = _check_int("min_fonts", min_fonts, 1)
    seed = _check_int("seed", seed, None)
    if max_classes is not None:
        max_classes = _check_int("max_classes", max_classes, 1)
    files = font_files()
    if min_fonts > len(files):
        raise FewshotError(f"min_fonts={min_fonts} is more than the {len(files)} fonts available")
    params = {"size": list(hw), "per_class": per_class, "min_fonts": min_fonts, "seed": seed,
              "max_classes": max_classes, "fonts": [f.name for f in files], "version": GLYPHS_VERSION,
              "pillow": PIL.__version__, "unicode": unicodedata.unidata_version}
    if cache is None or cache is True:
        cache = cache_dir()
    return cached(files, params, lambda: _build(files, hw, per_class, min_fonts, seed, max_classes),
                  tag="glyphs", cache=cache)
