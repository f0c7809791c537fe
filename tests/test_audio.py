"""Audio clips as MFCC maps: the features against a hand computation, WAV folders (written here with the
stdlib ``wave`` module) as float32 ClassDatasets, settings recorded in Preprocess, the conv1d backbone, and
protonets with mlp and conv1d encoders trained through the CLI on tones of class-specific pitch."""
from __future__ import annotations

import cmath
import importlib.util
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import fewshot.data as fsdata
from fewshot.data import audio
from fewshot.data.audio import AudioFeatures, audio_folder, mfcc
from fewshot.data.images import Preprocess
from fewshot.errors import FewshotError
from fewshot.models import Conv1d

from test_cli import run_cli

needs_audio = pytest.mark.skipif(importlib.util.find_spec("soundfile") is None,
                                 reason="the 'audio' extra (soundfile) is not installed: pip install 'fewshot[audio]'")

N_CLASSES, PER_CLASS = 8, 6


def write_wav(path: Path, signal: np.ndarray, rate: int, channels: int = 1) -> None:
    """16-bit PCM WAV with the stdlib (``signal`` in [-1, 1], [n] or [n, channels])."""
    pcm = np.clip(np.round(np.asarray(signal).reshape(-1) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def make_tones(root: Path, n_classes: int = N_CLASSES, per_class: int = PER_CLASS) -> Path:
    """Class c: a tone at 250 * 1.45^c Hz (and its 2nd harmonic), random phase, amplitude, a +-2% pitch
    jitter and noise; lengths 0.6-1.3 s (padded or cut), mostly 16 kHz, some 8 kHz, one stereo clip."""
    rng = np.random.RandomState(0)
    for c in range(n_classes):
        d = root / f"tone{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            rate = 8000 if i % 3 == 2 else 16000
            n = int(rate * rng.uniform(0.6, 1.3))
            t = np.arange(n) / rate
            f = 250 * 1.45 ** c * rng.uniform(0.98, 1.02)
            x = rng.uniform(0.2, 0.5) * (np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
                                         + 0.3 * np.sin(4 * np.pi * f * t))
            x = x + 0.01 * rng.randn(n)
            if c == 0 and i == 0:
                write_wav(d / f"clip{i}.wav", np.stack([x, 0.5 * x], 1), rate, channels=2)
            else:
                write_wav(d / f"clip{i}.wav", x, rate)
    return root


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return make_tones(tmp_path_factory.mktemp("audio") / "tones")


# ------------------------------------------------------------------------------------------ features
def _mfcc_by_hand(x: list, sr: int, n_fft: int, win: int, hop: int, n_mels: int, n_mfcc: int, fmin: float) -> list:
    """The module docstring's recipe written out with loops (no numpy)."""
    pad = n_fft // 2
    padded = [x[pad - k] for k in range(pad)] + x + [x[len(x) - 2 - k] for k in range(pad)]   # reflection
    off = (n_fft - win) // 2
    w = [0.0] * n_fft
    for n in range(win):
        w[off + n] = 0.5 - 0.5 * math.cos(2 * math.pi * n / win)
    mel = lambda f: 2595 * math.log10(1 + f / 700)                                       # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)                                          # noqa: E731
    lo, hi = mel(fmin), mel(sr / 2)
    edges = [hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = [[0.0] * (1 + len(x) // hop) for _ in range(n_mfcc)]
    for t in range(1 + len(x) // hop):
        frame = padded[t * hop:t * hop + n_fft]
        logmel = []
        for m in range(n_mels):
            e = 0.0
            for k in range(n_fft // 2 + 1):
                f = k * sr / n_fft
                a, b, c = edges[m], edges[m + 1], edges[m + 2]
                h = max(0.0, min((f - a) / (b - a), (c - f) / (c - b)))
                s = sum(w[n] * frame[n] * cmath.exp(-2j * math.pi * k * n / n_fft) for n in range(n_fft))
                e += h * abs(s) ** 2
            logmel.append(10 * math.log10(max(e, 1e-10)))
        for j in range(n_mfcc):
            scale = math.sqrt(1 / n_mels) if j == 0 else math.sqrt(2 / n_mels)
            out[j][t] = scale * sum(logmel[m] * math.cos(math.pi * j * (m + 0.5) / n_mels) for m in range(n_mels))
    return out


def test_mfcc_matches_a_hand_computation() -> None:
    feat = AudioFeatures(sample_rate=16, duration=1.0, n_fft=8, win_length=6, hop_length=4, n_mels=3, n_mfcc=2,
                         fmin=0.0)
    rng = np.random.RandomState(3)
    x = rng.uniform(-1, 1, 13)                       # shorter than 16 samples: zero-padded at the end
    got = mfcc(x, feat)
    assert got.shape == (2, 5) and got.dtype == np.float32 and feat.shape == (1, 2, 5)
    want = _mfcc_by_hand(list(x) + [0.0] * 3, 16, 8, 6, 4, 3, 2, 0.0)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-4)
    longer = np.concatenate([x, [0.0] * 3, rng.uniform(-1, 1, 9)])    # cut after 16 samples
    np.testing.assert_allclose(mfcc(longer, feat), got, rtol=1e-6, atol=1e-6)


def test_a_tone_peaks_in_the_mel_band_of_its_pitch() -> None:
    feat = AudioFeatures()
    t = np.arange(feat.samples) / feat.sample_rate
    c = mfcc(np.sin(2 * np.pi * 1000 * t), feat)     # n_mfcc = n_mels: the DCT can be undone exactly
    log_mel = audio.dct_matrix(feat.n_mels, feat.n_mels).T @ c
    fb = audio.mel_filterbank(feat)
    centre = np.argmax(fb, axis=1) * feat.sample_rate / feat.n_fft
    assert abs(centre[int(np.argmax(log_mel[:, 50]))] - 1000) < 80
    with pytest.raises(FewshotError, match="n_mfcc"):
        AudioFeatures(n_mels=20, n_mfcc=40)
    with pytest.raises(FewshotError, match="fmax"):
        AudioFeatures(fmax=9000.0)


# ------------------------------------------------------------------------------------------ folders
@needs_audio
def test_folder_of_clips_becomes_float_mfcc_maps(tones: Path) -> None:
    ds = audio_folder(tones, cache=False)
    feat = AudioFeatures()
    assert len(ds) == N_CLASSES and ds.names == [f"tone{c:02d}" for c in range(N_CLASSES)]
    assert ds.data.dtype == torch.float32 and ds.data.shape == (N_CLASSES * PER_CLASS, 1, 40, 101)
    assert torch.isfinite(ds.data).all()
    assert ds.preprocess == feat.preprocess() and ds.preprocess.audio == feat.to_dict()
    assert ds.preprocess.size == (40, 101) and ds.preprocess.channels == 1
    again = audio_folder(tones, cache=False)                  # deterministic
    assert torch.equal(again.data, ds.data)
    one = audio.clip_features(tones / "tone03" / "clip1.wav", feat)
    assert torch.equal(one, ds.images(3)[1])
    small = audio_folder(tones, features={"n_mels": 20, "n_mfcc": 13, "hop_length": 320}, cache=False)
    assert small.image_shape == (1, 13, 51) and small.preprocess.audio["n_mfcc"] == 13


@needs_audio
def test_settings_recorded_in_preprocess_drive_load_like_and_the_cache(tones: Path, tmp_path, monkeypatch) -> None:
    assert fsdata.kind_of(str(tones)) == "audio"
    pre = Preprocess.from_dict(AudioFeatures(n_mfcc=13).preprocess().to_dict())
    assert pre.audio["n_mfcc"] == 13 and pre.size == (13, 101)
    assert "audio" not in Preprocess().to_dict()              # image runs keep their old format
    assert Preprocess.from_dict({"size": [28, 28], "channels": 1, "invert": True}).audio is None
    ds = fsdata.load_like(str(tones), pre, cache=False)
    assert ds.image_shape == (1, 13, 101)
    with pytest.raises(FewshotError, match="trained on images"):
        fsdata.load_like(str(tones), Preprocess(size=(28, 28)), cache=False)
    # the cache: written once, reused (no decoding), invalidated by a changed clip
    cache = tmp_path / "c"
    first = audio_folder(tones, cache=cache)
    assert len(list(cache.glob("audio-*.pt"))) == 1
    monkeypatch.setattr(audio, "load_clips", lambda *a: pytest.fail("the cache was not used"))
    assert torch.equal(audio_folder(tones, cache=cache).data, first.data)


@needs_audio
def test_bad_clips_and_folders_give_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    with pytest.raises(FewshotError, match="has no audio clips"):
        audio_folder(root, cache=False)
    (root / "a" / "x.wav").write_bytes(b"RIFF....not audio")
    with pytest.raises(FewshotError, match=r"cannot read audio clip .*x\.wav"):
        audio_folder(root, cache=False)
    with pytest.raises(FewshotError, match="no audio clips"):
        audio.list_clips(tmp_path)


def test_missing_extra_names_it(monkeypatch, tmp_path) -> None:
    import builtins
    real = builtins.__import__

    def no_soundfile(name, *a, **k):
        if name == "soundfile":
            raise ImportError("no soundfile")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_soundfile)
    (tmp_path / "a").mkdir()
    with pytest.raises(FewshotError, match=r"pip install 'fewshot\[audio\]'"):
        audio_folder(tmp_path, cache=False)


# ------------------------------------------------------------------------------------------ conv1d
def test_conv1d_backbone_convolves_over_time() -> None:
    net = Conv1d(40, hidden=16)
    assert net(torch.randn(5, 1, 40, 101)).shape == (5, 16)
    assert net(torch.randn(2, 1, 40, 3)).shape == (2, 16)   # shorter than 2^4 frames still works
    net.eval()
    x = torch.randn(3, 1, 40, 20)
    assert torch.allclose(net(x), net(x[:, 0]))            # [B, F, T] is the same input
    assert sum(isinstance(m, torch.nn.Conv1d) for m in net.modules()) == 4
    from fewshot.methods.protonet import make_backbone
    with pytest.raises(FewshotError, match="conv1d needs feature maps"):
        make_backbone("conv1d", (3, 32, 32), 16, [32], 16)


# ------------------------------------------------------------------------------------------ CLI
@needs_audio
@pytest.mark.parametrize("backbone", ["mlp", "conv1d"])
def test_protonet_on_tones_trains_evaluates_and_plots(capsys, tmp_path: Path, tones: Path, backbone: str) -> None:
    run = tmp_path / backbone
    rc, out, err = run_cli(capsys, "train", "protonet", "--data", tones, "--backbone", backbone,
                           "--hidden", "32", "--mlp-hidden", "64", "--embedding", "32", "--split", "fraction:0.5",
                           "--ways", "3", "--shots", "1", "--queries", "3", "--episodes", "60", "--lr", "0.003",
                           "--val-every", "0", "--test-ways", "3", "--test-shots", "1", "--test-queries", "3", "--test-episodes", "60",
                           "--no-progress", "--out", run)
    assert rc == 0, err
    acc = float(out.split("test accuracy:")[1].split("±")[0]) / 100
    assert acc > 0.6, out                                     # 3-way: chance is 1/3; held-out pitches
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "2", "--shots", "2", "--queries", "2",
                           "--episodes", "20", "--no-progress")
    assert rc == 0 and "2-way 2-shot" in out, err
    rc, out, err = run_cli(capsys, "plot", run)
    assert rc == 0, err


@needs_audio
def test_support_and_queries_are_processed_like_training(tones: Path, tmp_path: Path) -> None:
    """What predict needs: a support folder and loose query clips with the run's MFCC settings."""
    pre = AudioFeatures(n_mfcc=13, n_mels=26).preprocess()
    sup = fsdata.load_support(str(tones), pre)
    assert sup.image_shape == (1, 13, 101)
    files = fsdata.list_queries(str(tones / "tone02"), pre)
    assert [f.name for f in files] == [f"clip{i}.wav" for i in range(PER_CLASS)]
    q = fsdata.load_queries(files, pre)
    assert q.dtype == torch.float32 and torch.equal(q, sup.images(2))


@needs_audio
def test_predict_labels_clips_through_the_cli(capsys, tmp_path: Path, tones: Path) -> None:
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "protonet", "--data", tones, "--backbone", "mlp", "--split", "fraction:0.5",
                         "--ways", "3", "--shots", "1", "--queries", "3", "--episodes", "60", "--lr", "0.003", "--val-every", "0",
                         "--test-ways", "3", "--test-queries", "2", "--test-episodes", "5", "--no-progress", "--out", run)
    assert rc == 0, err
    sup = tmp_path / "support"
    for c in (0, 3, 7):                                       # pitches far apart
        (sup / f"tone{c:02d}").mkdir(parents=True)
        (sup / f"tone{c:02d}" / "a.wav").write_bytes((tones / f"tone{c:02d}" / "clip0.wav").read_bytes())
    rc, out, err = run_cli(capsys, "predict", run, "--support", sup, "--query", tones / "tone03" / "clip3.wav",
                           "--no-progress")
    assert rc == 0, err
    assert out.split("\t")[1] == "tone03"
