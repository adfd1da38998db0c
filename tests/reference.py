"""VGGish computed independently of the project: plain NumPy on the checkpoint's raw tensors."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

CONVS = ["conv1", "conv2", "conv3/conv3_1", "conv3/conv3_2", "conv4/conv4_1", "conv4/conv4_2"]
POOL_AFTER = {"conv1", "conv2", "conv3/conv3_2", "conv4/conv4_2"}


def conv3x3_same(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # n, h, w, c, 3, 3
    return np.einsum("nhwcij,ijck->nhwk", windows, w, optimize=True) + b


def maxpool2x2(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def vggish(weights: dict[str, np.ndarray], spectrograms: np.ndarray, relu_embedding: bool) -> np.ndarray:
    """The seed's model in float64: 3x3 SAME convs with ReLU, 2x2 pools, fc1 x2 with ReLU, fc2."""
    out = []
    for i in range(0, len(spectrograms), 8):
        x = spectrograms[i : i + 8, :, :, None].astype(np.float64)
        for name in CONVS:
            x = np.maximum(conv3x3_same(x, weights[f"vggish/{name}/weights"], weights[f"vggish/{name}/biases"]), 0)
            if name in POOL_AFTER:
                x = maxpool2x2(x)
        x = x.reshape(len(x), -1)
        for name in ["fc1/fc1_1", "fc1/fc1_2"]:
            x = np.maximum(x @ weights[f"vggish/{name}/weights"] + weights[f"vggish/{name}/biases"], 0)
        x = x @ weights["vggish/fc2/weights"] + weights["vggish/fc2/biases"]
        out.append(np.maximum(x, 0) if relu_embedding else x)
    return np.concatenate(out)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal within rtol of the embeddings' scale (element-wise relative error is meaningless near 0)."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def upstream_examples(path, pad: bool = False) -> np.ndarray:
    """Upstream's `vggish_input.wavfile_to_examples`, step by step: soundfile's int16 read / 32768
    (float files as their floats: see producer/audio.py), the mean over channels, resampy to
    16 kHz, and the log-mel by TensorFlow's tf.signal (STFT with periodic Hann, HTK mel matrix).
    `pad`: a waveform shorter than one example (0.975 s) is zero-padded to one first."""
    import resampy
    import soundfile

    from worker.runtime import load_tensorflow

    tf = load_tensorflow()
    if soundfile.info(str(path)).subtype in ("FLOAT", "DOUBLE"):
        data, rate = soundfile.read(path, dtype="float64")
    else:
        data, rate = soundfile.read(path, dtype="int16")
        data = data / 32768.0
    if data.ndim > 1:
        data = np.mean(data, axis=1)
    if rate != 16000:
        data = resampy.resample(data, rate, 16000)
    if pad and len(data) < 15600:
        data = np.concatenate([data, np.zeros(15600 - len(data))])
    stft = tf.signal.stft(data, frame_length=400, frame_step=160, fft_length=512, window_fn=tf.signal.hann_window)
    mel = tf.signal.linear_to_mel_weight_matrix(64, 257, 16000, 125.0, 7500.0, dtype=tf.float64)
    log_mel = np.log(np.abs(stft.numpy()) @ mel.numpy() + 0.01)
    rows = len(log_mel) // 96
    return log_mel[: rows * 96].reshape(rows, 96, 64)
