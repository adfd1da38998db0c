"""Writing test recordings as real wav files, in the encodings recorders produce."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def tone(seconds: float, hz: float = 1000.0, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amplitude * np.sin(2 * np.pi * hz * t)


def wav_bytes(samples: np.ndarray, rate: int, bits: int = 16, float_samples: bool = False, channels: int = 1) -> bytes:
    """A complete RIFF/WAVE file: PCM 8/16/24/32-bit or IEEE float 32-bit, the signal copied to every channel."""
    x = np.repeat(np.asarray(samples, dtype=np.float64)[:, None], channels, axis=1).reshape(-1)
    if float_samples:
        data, kind = x.astype("<f4").tobytes(), 3
    elif bits == 8:
        data, kind = np.round(x * 127 + 128).astype(np.uint8).tobytes(), 1
    elif bits == 24:
        v = np.round(x * (2**23 - 1)).astype("<i4")
        data, kind = v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes(), 1
    else:
        data, kind = np.round(x * (2 ** (bits - 1) - 1)).astype(f"<i{bits // 8}").tobytes(), 1
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", kind, channels, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, **encoding) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(samples, rate, **encoding))
    return path


def speech_like(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(n, channels) in [-0.8, 0.8]: a voiced sweep with formant-like harmonics, syllable envelope and
    noise, loud up to the last sample (so a resampler that wraps the clip around shows at the start)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    pitch = 120 + 60 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 30) if k * 180 < rate / 2)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.1 * t) ** 2
    mono = envelope * voice + 0.05 * rng.standard_normal(len(t))
    out = np.stack([mono, np.roll(mono, 37) * 0.7 + 0.02 * rng.standard_normal(len(t))][:channels], axis=1)
    return 0.8 * out / np.abs(out).max()


def write_audio(path: Path, samples: np.ndarray, rate: int, subtype: str, format: str | None = None) -> Path:
    """Any format libsndfile writes (WAV, FLAC, OGG, MP3, AIFF…), by soundfile."""
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate, subtype=subtype, format=format)
    return path
