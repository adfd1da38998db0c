"""Recordings to VGGish examples, exactly as upstream's `vggish_input.wavfile_to_examples` makes them.

Read with soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3, AIFF and the rest it knows) as int16
divided by 32768, the mean over channels, `resampy` to 16 kHz, then the log-mel recipe the
checkpoint was trained on: 25 ms periodic-Hann STFT with a 10 ms hop and a 512-point FFT, 64 mel
bands from 125 to 7500 Hz (HTK mel scale, DC bin zeroed), log(mel + 0.01), and non-overlapping
examples of 96 frames.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile

from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.spectrogram import BANDS, FRAMES

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
FFT = 512  # next power of two above WINDOW
LOW_HZ, HIGH_HZ = 125.0, 7500.0
LOG_OFFSET = 0.01
MIN_SAMPLES = WINDOW + (FRAMES - 1) * HOP  # 15,600 samples = 0.975 s give one example

# What a folder scan takes for a recording: every format libsndfile reads (but headerless RAW),
# their usual other names, and audio it cannot read, so that such a file is refused with its
# reason rather than passed over in silence.
AUDIO_SUFFIXES = frozenset(
    {f".{f.lower()}" for f in soundfile.available_formats() if f != "RAW"}
    | {".wave", ".aif", ".aifc", ".oga", ".opus", ".snd", ".m4a", ".aac", ".wma", ".webm", ".mka", ".amr"}
)


FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


def is_recording(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Samples in [-1, 1], shape (n, channels), and the rate, as upstream reads them: int16 / 32768.

    Except float files (WAV, AIFF… holding FLOAT or DOUBLE samples): an int16 read makes
    libsndfile round each sample to -1, 0 or 1, so upstream turns them into silence. They are
    read as the floats they are, which is the scale upstream's division means.
    """
    try:
        open(path, "rb").close()  # the OS's own reason (no such file, no permission), not libsndfile's "System error"
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    try:
        # soundfile.read itself, as upstream: it seeks to the start first, and after that seek
        # libmpg123 decodes a few MP3 samples 1 LSB apart from a fresh read.
        if soundfile.info(str(path)).subtype in FLOAT_SUBTYPES:
            return soundfile.read(path, dtype="float64", always_2d=True)
        data, rate = soundfile.read(path, dtype="int16", always_2d=True)
        return data / 32768.0, rate
    except (RuntimeError, TypeError, ValueError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise InputError(f"{path}: cannot read audio ({getattr(e, 'error_string', e)})") from e


def resample(mono: np.ndarray, rate: int) -> np.ndarray:
    """To 16 kHz with resampy's default filter (kaiser_best), as upstream does."""
    if rate == SAMPLE_RATE or len(mono) == 0:
        return mono
    import resampy  # here: it loads numba, which only files at other rates need

    try:
        return resampy.resample(mono, rate, SAMPLE_RATE)
    except ValueError:  # too few samples for the filter: as good as empty
        return mono[:0]


def warm_up() -> None:
    """Load resampy (and compile or load its numba code) now: ~0.7 s the first clip need not wait."""
    resample(np.zeros(MIN_SAMPLES), 44100)


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz) / 700.0)


@functools.cache  # a constant: made once per process, not per clip (a third of a clip's log-mel)
def mel_matrix() -> np.ndarray:
    """(257, 64) triangular weights from FFT bins to mel bands, as in VGGish's mel_features."""
    bins_mel = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT // 2 + 1))
    edges = np.linspace(hz_to_mel(LOW_HZ), hz_to_mel(HIGH_HZ), BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    weights.flags.writeable = False  # shared by every call
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


def file_examples(path: Path, pad: bool = False, rows: int | None = None) -> np.ndarray:
    """The VGGish examples of one recording; InputError if it is unreadable or gives no example.

    With pad, a clip shorter than 0.975 s is zero-padded to one example instead of refused
    (the speech-commands set has many clips just under a second). With `rows`, the first `rows`
    examples at most, and a short clip padded to one: `rows=1` is one row per file whatever its
    length, as the seed's frame has. The waveform is cut after resampling, so those rows are the
    first rows of the whole file's examples.
    """
    samples, rate = read_audio(path)
    mono = resample(samples.mean(axis=1), rate)
    if len(mono) < MIN_SAMPLES:
        if not pad and rows is None:
            raise InputError(
                f"{path}: too short ({len(mono) / SAMPLE_RATE:.3f} s); one row needs "
                f"{MIN_SAMPLES / SAMPLE_RATE:.3f} s (use --pad to zero-pad short clips)"
            )
        mono = np.concatenate([mono, np.zeros(MIN_SAMPLES - len(mono))])
    if rows is not None:
        mono = mono[: WINDOW + (rows * FRAMES - 1) * HOP]
    return examples(mono)
