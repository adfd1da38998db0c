"""Recordings to VGGish examples: read a wav file, mix to mono, resample to 16 kHz, log-mel, 96-frame rows.

The recipe is the one the VGGish checkpoint was trained on (`vggish_input.waveform_to_examples`):
25 ms periodic-Hann STFT with a 10 ms hop and a 512-point FFT, 64 mel bands from 125 to 7500 Hz
(HTK mel scale, DC bin zeroed), log(mel + 0.01), and non-overlapping examples of 96 frames.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from worker.errors import InputError
from worker.spectrogram import BANDS, FRAMES

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
FFT = 512  # next power of two above WINDOW
LOW_HZ, HIGH_HZ = 125.0, 7500.0
LOG_OFFSET = 0.01
MIN_SAMPLES = WINDOW + (FRAMES - 1) * HOP  # 15,600 samples = 0.975 s give one example

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Samples as float64 in [-1, 1], shape (n, channels), and the sample rate. PCM 8/16/24/32-bit or float."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(f"{path}: not a wav file (no RIFF/WAVE header)")
    fmt, samples, pos = None, None, 12
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if tag == b"fmt ":
            fmt = body
        elif tag == b"data":
            samples = body  # a header still saying 0 or 0xFFFFFFFF (streamed) is cut to what is there
            break
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16 or samples is None:
        raise InputError(f"{path}: wav file without a fmt and a data chunk")
    kind, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", fmt)
    if kind == _EXTENSIBLE and len(fmt) >= 26:
        kind = struct.unpack_from("<H", fmt, 24)[0]
    sane = 1 <= channels <= 64 and 1000 <= rate <= 768000 and bits in (8, 16, 24, 32, 64)
    if not sane or align != channels * bits // 8:
        raise InputError(f"{path}: unsupported wav layout ({channels} channels, {rate} Hz, {bits} bits)")
    width = bits // 8
    usable = len(samples) - len(samples) % align
    raw = np.frombuffer(samples, dtype=np.uint8, count=usable)
    if kind == _FLOAT and bits in (32, 64):
        x = raw.view(f"<f{width}").astype(np.float64)
    elif kind == _PCM and bits == 8:
        x = (raw.astype(np.float64) - 128.0) / 128.0
    elif kind == _PCM and bits == 24:
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8) / float(1 << 23)
    elif kind == _PCM and bits in (16, 32):
        x = raw.view(f"<i{width}") / float(1 << (bits - 1))
    else:
        raise InputError(f"{path}: unsupported wav encoding (format {kind}, {bits} bits)")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: NaN or Inf samples")
    return x.reshape(-1, channels), rate


def resample(mono: np.ndarray, rate: int) -> np.ndarray:
    """Band-limited resampling to 16 kHz by zero-padding or truncating the spectrum."""
    if rate == SAMPLE_RATE or len(mono) == 0:
        return mono
    n_out = int(round(len(mono) * SAMPLE_RATE / rate))
    spectrum = np.fft.rfft(mono)
    keep = min(len(spectrum), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    out[:keep] = spectrum[:keep]
    return np.fft.irfft(out, n_out) * (n_out / len(mono))


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz) / 700.0)


def mel_matrix() -> np.ndarray:
    """(257, 64) triangular weights from FFT bins to mel bands, as in VGGish's mel_features."""
    bins_mel = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT // 2 + 1))
    edges = np.linspace(hz_to_mel(LOW_HZ), hz_to_mel(HIGH_HZ), BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """(frames, 64) log-mel of a 16 kHz mono waveform; frames = 1 + (n - 400) // 160."""
    frames = 1 + (len(waveform) - WINDOW) // HOP
    if frames < 1:
        return np.zeros((0, BANDS))
    index = np.arange(WINDOW)[None, :] + HOP * np.arange(frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann
    magnitude = np.abs(np.fft.rfft(waveform[index] * window, FFT))
    return np.log(magnitude @ mel_matrix() + LOG_OFFSET)


def examples(waveform: np.ndarray) -> np.ndarray:
    """(rows, 96, 64) non-overlapping examples; a trailing part shorter than 96 frames is dropped."""
    features = log_mel(waveform)
    rows = len(features) // FRAMES
    return features[: rows * FRAMES].reshape(rows, FRAMES, BANDS)


def wav_examples(path: Path, pad: bool = False) -> np.ndarray:
    """The VGGish examples of one wav file; InputError if it is unreadable or gives no example.

    With pad, a clip shorter than 0.975 s is zero-padded to one example instead of refused
    (the speech-commands set has many clips just under a second).
    """
    samples, rate = read_wav(path)
    mono = resample(samples.mean(axis=1), rate)
    if len(mono) < MIN_SAMPLES:
        if not pad:
            raise InputError(
                f"{path}: too short ({len(mono) / SAMPLE_RATE:.3f} s); one row needs "
                f"{MIN_SAMPLES / SAMPLE_RATE:.3f} s (use --pad to zero-pad short clips)"
            )
        mono = np.concatenate([mono, np.zeros(MIN_SAMPLES - len(mono))])
    return examples(mono)
