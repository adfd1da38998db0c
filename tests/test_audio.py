"""The recording -> log-mel front end against upstream's recipe (soundfile, resampy) in every format
and rate, and against known values: frame counts, tone bands, TensorFlow's own STFT and mel code."""

from __future__ import annotations

import numpy as np
import pytest
from reference import upstream_examples
from wavs import speech_like, tone, write_audio, write_wav

from producer import audio
from vggish_pipeline.core.errors import InputError
from worker.runtime import load_tensorflow


@pytest.mark.parametrize(
    ("seconds", "stft_frames", "rows"),
    [(1.0, 98, 1), (0.96, 94, 0), (0.5, 48, 0), (3.0, 298, 3), (0.975, 96, 1)],
)
def test_frame_and_row_counts_follow_the_recipe(tmp_path, seconds, stft_frames, rows):
    # 25 ms windows every 10 ms: 1 + (n - 400) // 160 frames; rows are whole 96-frame blocks
    waveform = tone(seconds)
    assert audio.log_mel(waveform).shape == (stft_frames, 64)
    path = write_wav(tmp_path / "clip.wav", waveform)
    if rows:
        assert audio.file_examples(path).shape == (rows, 96, 64)
    else:
        with pytest.raises(InputError, match=r"too short \(\d\.\d+ s\); one row needs 0\.975 s"):
            audio.file_examples(path)
        assert audio.file_examples(path, pad=True).shape == (1, 96, 64)


def band_of(hz: float) -> int:
    """The mel band whose centre lies nearest `hz`: 64 bands evenly spaced in HTK mel from 125 to 7500 Hz."""
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    centres_mel = np.linspace(mel(125.0), mel(7500.0), 66)[1:-1]
    centres_hz = 700.0 * (np.exp(centres_mel / 1127.0) - 1.0)
    return int(np.argmin(np.abs(centres_hz - hz)))


@pytest.mark.parametrize("hz", [300.0, 1000.0, 4000.0])
def test_a_pure_tone_peaks_in_its_mel_band(tmp_path, hz):
    rows = audio.file_examples(write_wav(tmp_path / "tone.wav", tone(2.0, hz)))
    profile = rows.mean(axis=(0, 1))
    assert int(profile.argmax()) == band_of(hz)
    assert profile.max() - np.median(profile) > 5.0  # a clear peak in log units, not noise
    silent = audio.file_examples(write_wav(tmp_path / "silence.wav", np.zeros(16000)))
    np.testing.assert_array_equal(silent, np.log(0.01))  # log(0 + offset)


def test_log_mel_equals_tensorflow_signal():
    """tf.signal's STFT (periodic Hann) and HTK mel matrix are an independent implementation of the same recipe."""
    tf = load_tensorflow()
    waveform = np.random.default_rng(0).normal(0, 0.1, 24000)
    stft = tf.signal.stft(waveform, frame_length=400, frame_step=160, fft_length=512, window_fn=tf.signal.hann_window)
    mel = tf.signal.linear_to_mel_weight_matrix(64, 257, 16000, 125.0, 7500.0, dtype=tf.float64)
    expected = np.log(np.abs(stft.numpy()) @ mel.numpy() + 0.01)
    np.testing.assert_allclose(audio.log_mel(waveform), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "encoding",
    [
        {"rate": 48000, "bits": 24, "channels": 2},
        {"rate": 44100, "bits": 32, "float_samples": True},
        {"rate": 22050, "bits": 32},
        {"rate": 8000, "bits": 8},
    ],
)
def test_other_rates_and_encodings_match_16k_mono(tmp_path, encoding):
    rate = encoding.pop("rate")
    reference = audio.file_examples(write_wav(tmp_path / "ref.wav", tone(2.0)))
    converted = audio.file_examples(write_wav(tmp_path / "other.wav", tone(2.0, rate=rate), rate, **encoding))
    assert converted.shape == reference.shape
    band = band_of(1000.0)
    tolerance = 0.01 if encoding.get("bits") == 8 else 1e-3  # 8-bit samples carry their own quantization noise
    np.testing.assert_allclose(converted[:, :, band], reference[:, :, band], atol=tolerance)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.wav", b"not audio at all", r"cannot read audio \(Format not recognised"),
        ("bad.wav", b"RIFF\x04\x00\x00\x00WAVE", "cannot read audio"),
        ("bad.flac", b"", r"cannot read audio \(Format not recognised"),
        ("bad.ogg", b"OggS" + bytes(60), "cannot read audio"),
    ],
)
def test_unreadable_files_get_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        audio.file_examples(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(
    ("suffix", "subtype"), [(".wav", "PCM_16"), (".wav", "PCM_24"), (".wav", "FLOAT"), (".flac", "PCM_16"), (".flac", "PCM_24")]
)
def test_rows_equal_upstreams_recipe(tmp_path, rate, channels, suffix, subtype):
    path = write_audio(tmp_path / f"word{suffix}", speech_like(2.3, rate, channels), rate, subtype)
    rows = audio.file_examples(path)
    assert rows.shape == (2, 96, 64)
    np.testing.assert_allclose(rows, upstream_examples(path), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("suffix", "subtype", "rate"), [(".ogg", "VORBIS", 44100), (".mp3", "MPEG_LAYER_III", 48000), (".aiff", "PCM_16", 22050)]
)
def test_lossy_and_other_containers_equal_upstreams_recipe(tmp_path, suffix, subtype, rate):
    path = write_audio(tmp_path / f"word{suffix}", speech_like(2.3, rate, 2), rate, subtype)
    rows = audio.file_examples(path)
    assert len(rows) >= 2
    np.testing.assert_allclose(rows, upstream_examples(path), rtol=0, atol=1e-6)


def test_a_float_file_is_read_at_its_scale_not_rounded_to_silence(tmp_path):
    """An int16 read of float samples rounds them to -1, 0, 1 (upstream's silent failure); the float
    file must give the same rows as the 16-bit file of the same signal, within 16-bit quantization."""
    signal = speech_like(2.0, 16000)
    as_float = audio.file_examples(write_audio(tmp_path / "f.wav", signal, 16000, "FLOAT"))
    as_pcm = audio.file_examples(write_audio(tmp_path / "i.wav", signal, 16000, "PCM_16"))
    loud = as_pcm > np.log(0.01) + 3  # where there is signal, well above the log offset
    assert loud.mean() > 0.5
    np.testing.assert_allclose(as_float[loud], as_pcm[loud], atol=0.02)
