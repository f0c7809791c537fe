"""Audio clips as MFCC feature maps: ``audio_folder(root)`` reads ``root/<class>/<clip>.wav``.

Each clip is decoded with soundfile (libsndfile: WAV, FLAC, OGG, AIFF, MP3; the ``audio`` extra,
``pip install 'fewshot[audio]'``), mixed to mono, resampled to ``sample_rate`` (polyphase filter), cut or
zero-padded at the end to ``duration`` seconds (``L = round(duration * sample_rate)`` samples) and turned
into mel-frequency cepstral coefficients (Davis & Mermelstein 1980) computed here with numpy:

1. frames: the signal is padded by ``n_fft // 2`` on both sides (reflection) and cut into frames
   ``x_t[n] = x[t * hop_length + n]``, ``n < n_fft``, ``t = 0 .. L // hop_length`` (so
   ``T = 1 + L // hop_length`` frames); each is multiplied by a periodic Hann window of ``win_length``
   samples centred in the ``n_fft`` frame: ``w[n] = 0.5 - 0.5 cos(2 pi n / win_length)``.
2. power spectrum ``P_t[k] = |sum_n w[n] x_t[n] exp(-2 pi i k n / n_fft)|^2``, ``k = 0 .. n_fft / 2``.
3. mel energies ``E_t[m] = sum_k H_m[k] P_t[k]`` with ``n_mels`` triangular filters ``H_m`` (peak 1) whose
   edges are equally spaced on the HTK mel scale ``mel(f) = 2595 log10(1 + f / 700)`` between ``fmin``
   and ``fmax`` (default ``sample_rate / 2``).
4. log energies in decibels ``S_t[m] = 10 log10(max(E_t[m], 1e-10))``.
5. orthonormal DCT-II over the mel axis, first ``n_mfcc`` coefficients:
   ``c_t[j] = s_j sum_m S_t[m] cos(pi j (m + 1/2) / n_mels)``, ``s_0 = sqrt(1 / n_mels)``,
   ``s_j = sqrt(2 / n_mels)``.

A clip becomes a float32 map ``[1, n_mfcc, T]`` (the coefficients are the rows, time runs along the
columns), the layout of :class:`fewshot.models.Conv1d` (rows as channels, convolutions over time) and of
the MLP backbone (which flattens it). The settings are recorded in the data set's
:class:`~fewshot.data.images.Preprocess` (``audio``), so evaluation and prediction on new folders compute
exactly the same features. Defaults follow common keyword-spotting practice: 16 kHz, 1 s clips, 25 ms
windows every 10 ms, 40 mel bands, 40 coefficients (e.g. Tang & Lin 2018).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from math import gcd
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import FewshotError
from .dataset import ClassDataset
from .folder import cached_files, class_files, files_digest, list_files
from .images import Preprocess

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")


def is_audio_file(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def _soundfile():
    try:
        import soundfile
    except ImportError:
        raise FewshotError("reading audio clips needs the 'audio' extra: pip install 'fewshot[audio]' "
                           "(it installs soundfile)") from None
    return soundfile


@dataclass(frozen=True)
class AudioFeatures:
    """MFCC settings (see the module docstring for the equations)."""

    sample_rate: int = 16000
    duration: float = 1.0       #: seconds; clips are cut or zero-padded to this length
    n_fft: int = 512
    win_length: int = 400       #: 25 ms at 16 kHz
    hop_length: int = 160       #: 10 ms at 16 kHz
    n_mels: int = 40
    n_mfcc: int = 40
    fmin: float = 20.0
    fmax: Optional[float] = None  #: None: sample_rate / 2

    def __post_init__(self):
        bad = []
        if self.sample_rate < 1:
            bad.append(f"sample_rate={self.sample_rate}")
        if not self.duration > 0:
            bad.append(f"duration={self.duration}")
        if self.n_fft < 2 or not (1 <= self.win_length <= self.n_fft):
            bad.append(f"n_fft={self.n_fft}, win_length={self.win_length} (need 1 <= win_length <= n_fft)")
        if self.hop_length < 1:
            bad.append(f"hop_length={self.hop_length}")
        if self.n_mels < 1 or not (1 <= self.n_mfcc <= self.n_mels):
            bad.append(f"n_mels={self.n_mels}, n_mfcc={self.n_mfcc} (need 1 <= n_mfcc <= n_mels)")
        top = self.sample_rate / 2 if self.fmax is None else self.fmax
        if not (0 <= self.fmin < top <= self.sample_rate / 2):
            bad.append(f"fmin={self.fmin}, fmax={self.fmax} (need 0 <= fmin < fmax <= sample_rate / 2)")
        if bad:
            raise FewshotError("bad audio feature settings: " + "; ".join(bad))

    @property
    def samples(self) -> int:
        return int(round(self.duration * self.sample_rate))

    @property
    def frames(self) -> int:
        return 1 + self.samples // self.hop_length

    @property
    def shape(self) -> tuple:
        """The feature map of one clip: ``(1, n_mfcc, frames)``."""
        return (1, self.n_mfcc, self.frames)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "AudioFeatures":
        known = AudioFeatures.__dataclass_fields__
        unknown = [k for k in d if k not in known]
        if unknown:
            raise FewshotError(f"unknown audio feature setting {unknown[0]!r}")
        return AudioFeatures(**d)

    def preprocess(self) -> Preprocess:
        return Preprocess(size=(self.n_mfcc, self.frames), channels=1, invert=False, audio=self.to_dict())


# -------------------------------------------------------------------- features
def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(feat: AudioFeatures) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters with peak 1, edges equally spaced in mel."""
    fmax = feat.sample_rate / 2 if feat.fmax is None else feat.fmax
    edges = mel_to_hz(np.linspace(hz_to_mel(feat.fmin), hz_to_mel(fmax), feat.n_mels + 2))
    freqs = np.arange(feat.n_fft // 2 + 1) * feat.sample_rate / feat.n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs[None] - lo) / (mid - lo)
    fall = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rise, fall))


def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Orthonormal DCT-II rows ``[n_out, n_in]``."""
    j = np.arange(n_out)[:, None]
    m = np.arange(n_in)[None]
    d = np.cos(np.pi * j * (m + 0.5) / n_in) * np.sqrt(2.0 / n_in)
    d[0] *= np.sqrt(0.5)
    return d


def fix_length(signal: np.ndarray, samples: int) -> np.ndarray:
    """Cut to the first ``samples`` samples or zero-pad at the end."""
    if len(signal) >= samples:
        return signal[:samples]
    return np.concatenate([signal, np.zeros(samples - len(signal), dtype=signal.dtype)])


def mfcc(signal: np.ndarray, feat: AudioFeatures) -> np.ndarray:
    """MFCCs ``[n_mfcc, frames]`` (float32) of a mono signal at ``feat.sample_rate``, after fixing its length."""
    x = fix_length(np.asarray(signal, dtype=np.float64).reshape(-1), feat.samples)
    pad = feat.n_fft // 2
    mode = "reflect" if len(x) > pad else "constant"
    x = np.pad(x, pad, mode=mode)
    starts = np.arange(feat.frames) * feat.hop_length
    frames = x[starts[:, None] + np.arange(feat.n_fft)[None]]
    n = np.arange(feat.win_length)
    window = np.zeros(feat.n_fft)
    off = (feat.n_fft - feat.win_length) // 2
    window[off:off + feat.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * n / feat.win_length)
    power = np.abs(np.fft.rfft(frames * window, n=feat.n_fft, axis=1)) ** 2      # [T, n_fft/2 + 1]
    energies = power @ mel_filterbank(feat).T                                      # [T, n_mels]
    log_mel = 10.0 * np.log10(np.maximum(energies, 1e-10))
    return (log_mel @ dct_matrix(feat.n_mfcc, feat.n_mels).T).T.astype(np.float32)


def resample(signal: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling from ``rate`` to ``target`` Hz."""
    if rate == target:
        return signal
    from scipy.signal import resample_poly
    g = gcd(int(rate), int(target))
    return resample_poly(signal, target // g, rate // g)


def read_clip(path: str | os.PathLike, feat: AudioFeatures) -> np.ndarray:
    """Decode a clip into a mono float64 signal at ``feat.sample_rate``; unreadable files name the path."""
    sf = _soundfile()
    try:
        x, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except FileNotFoundError:
        raise FewshotError(f"audio clip not found: {path}") from None
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for unreadable input
        raise FewshotError(f"cannot read audio clip {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if x.shape[0] == 0:
        raise FewshotError(f"audio clip {path} is empty")
    return resample(x.mean(axis=1), int(rate), feat.sample_rate)


def clip_features(path: str | os.PathLike, feat: AudioFeatures) -> torch.Tensor:
    """One clip -> float32 ``[1, n_mfcc, frames]``."""
    return torch.from_numpy(mfcc(read_clip(path, feat), feat)).unsqueeze(0)


def load_clips(paths: Sequence[str | os.PathLike], feat: AudioFeatures) -> torch.Tensor:
    """Clips -> float32 ``[n, 1, n_mfcc, frames]``."""
    if not paths:
        return torch.zeros(0, *feat.shape)
    return torch.stack([clip_features(p, feat) for p in paths])


# -------------------------------------------------------------------- folders
def list_clips(path: str | os.PathLike) -> list:
    """The clips for ``path``: a folder -> its visible audio files (sorted, not recursive); a file -> [file]."""
    return list_files(path, is_audio_file, f"audio clips ({', '.join(AUDIO_EXTENSIONS)})")


def is_audio_folder(root: Path) -> bool:
    """Whether ``root``'s class subfolders hold audio clips (checks the first few)."""
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return False
    for d in subs[:5]:
        try:
            if any(is_audio_file(f.name) for f in d.iterdir() if not f.name.startswith(".")):
                return True
        except OSError:
            continue
    return False


def audio_folder(root: str | os.PathLike, features: AudioFeatures | dict | None = None,
                 cache: str | os.PathLike | bool | None = None) -> ClassDataset:
    """Load ``root/<class>/<clips>`` as MFCC maps: a float32 :class:`ClassDataset` ``[n, 1, n_mfcc, frames]``.

    Args:
        root: folder with one subfolder of clips per class (class name = subfolder name, sorted).
        features: :class:`AudioFeatures` (or its dict); defaults to ``AudioFeatures()``.
        cache: see :func:`fewshot.data.dataset.cached`; ``False`` disables caching.
    """
    root = Path(root)
    feat = AudioFeatures.from_dict(features) if isinstance(features, dict) else (features or AudioFeatures())
    if not root.is_dir():
        raise FewshotError(f"no such folder: {root}" if not root.exists() else
                           f"not a folder: {root} (expected one subfolder of audio clips per class)")
    _soundfile()
    classes = class_files(root, is_audio_file, f"audio clips ({', '.join(AUDIO_EXTENSIONS)})")
    pre = feat.preprocess()

    def build() -> ClassDataset:
        maps = [load_clips([p for p, _, _ in files], feat) for _, files in classes]
        return ClassDataset.from_class_tensors(maps, [n for n, _ in classes], None, pre,
                                               source=f"audio folder {root}")

    params = {"audio": feat.to_dict(), "files": files_digest(classes, root)}
    return cached_files(root, [root], params, build, "audio", cache)
