"""The model: official variable names, V1 and V2 checkpoints, the kept V2 copy, both embedding forms, clear errors."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import numpy as np
import pytest
from reference import assert_close

from vggish_pipeline.core import identity
from vggish_pipeline.core.errors import CheckpointError
from worker import checkpoint
from worker.model import Embedder


def rows(sample_source: Path, n: int = 8) -> np.ndarray:
    return np.fromfile(sample_source / "wavfile_spec.dat").reshape(-1, 96, 64)[:n]


def test_untrained_checkpoint_is_official_v1_layout(model_files):
    ckpt = model_files["checkpoint"]
    assert ckpt.is_file() and not Path(f"{ckpt}.index").exists()  # V1: one file, no .index/.data
    assert identity.checkpoint_files(ckpt) == [ckpt]
    variables = checkpoint.read_variables(ckpt)
    assert set(variables) == set(checkpoint.VARIABLE_SHAPES)
    assert "vggish/fc2/biases" in variables and variables["vggish/fc1/fc1_1/weights"].shape == (12288, 4096)
    assert checkpoint.is_untrained(checkpoint.check_variables(ckpt))


def test_v1_checkpoint_restores_and_matches_numpy_reference(model_files, weights, sample_source, expected, fingerprint_cache):
    model = Embedder(model_files["checkpoint"], fingerprint_cache, batch_size=16)  # 40 rows: sub-batches must stitch
    x = rows(sample_source, 40)
    linear = model.embed(x, "linear")
    relu = model.embed(x, "relu")
    assert linear.dtype == np.float32 and linear.shape == (40, 128)
    assert_close(linear, expected["linear"][:40])
    assert_close(relu, expected["relu"][:40])
    assert (relu == 0).any() and (linear < 0).any()  # the two forms really differ
    assert model.untrained and (model.device == "CPU" or model.device.startswith("GPU"))
    model.close()


def test_v2_checkpoint_loads_to_the_same_model(tmp_path, model_files, sample_source, fingerprint_cache):
    v2 = checkpoint.write_untrained_checkpoint(tmp_path / "v2.ckpt", seed=0, v1=False)
    assert Path(f"{v2}.index").exists()
    x = rows(sample_source, 4)
    a = Embedder(model_files["checkpoint"], fingerprint_cache).embed(x, "linear")
    b = Embedder(v2, fingerprint_cache).embed(x, "linear")
    np.testing.assert_array_equal(a, b)


def test_fingerprint_tells_checkpoints_apart(tmp_path, model_files, fingerprint_cache):
    other = checkpoint.write_untrained_checkpoint(tmp_path / "seed1.ckpt", seed=1)
    assert identity.fingerprint(other, fingerprint_cache) != identity.fingerprint(model_files["checkpoint"], fingerprint_cache)
    assert identity.fingerprint(model_files["checkpoint"], fingerprint_cache) == identity.fingerprint(model_files["checkpoint"], fingerprint_cache)


def test_fingerprint_cache_never_outlives_a_change(tmp_path, fingerprint_cache):
    path = checkpoint.write_untrained_checkpoint(tmp_path / "m.ckpt", seed=0)
    first = identity.fingerprint(path, fingerprint_cache)
    assert first in (fingerprint_cache / "fingerprints.json").read_text()  # remembered, and found again
    assert identity.fingerprint(path, fingerprint_cache) == first
    other = checkpoint.write_untrained_checkpoint(tmp_path / "other.ckpt", seed=1)
    path.write_bytes(other.read_bytes())  # rewritten in place: same path and size, other weights
    assert identity.fingerprint(path, fingerprint_cache) == identity.fingerprint(other, fingerprint_cache) != first
    (fingerprint_cache / "fingerprints.json").write_text("{not json")  # a damaged cache costs a hash, nothing else
    assert identity.fingerprint(path, fingerprint_cache) == identity.fingerprint(other, fingerprint_cache)


def wait_for_copy(prefix: Path) -> None:
    deadline = time.monotonic() + 120
    while not checkpoint.has_copy(prefix):
        assert time.monotonic() < deadline, f"no V2 copy at {prefix}"
        time.sleep(0.1)


def test_v1_weights_load_from_the_kept_v2_copy_and_never_from_a_damaged_one(tmp_path, monkeypatch, model_files, sample_source):
    cache = tmp_path
    ckpt, x = model_files["checkpoint"], rows(sample_source)
    first = Embedder(ckpt, cache)
    assert first.loaded() == ckpt  # nothing kept yet: the official V1 path
    expected = first.embed(x, "linear")
    copy = checkpoint.fast_copy(ckpt, first.fingerprint, cache)
    wait_for_copy(copy)  # written after the restore, beside the chunks
    again = Embedder(ckpt, cache)
    assert again.loaded() == copy and again.untrained  # the marker is read from the original
    np.testing.assert_array_equal(again.embed(x, "linear"), expected)

    data = checkpoint.copy_files(copy)[1]
    with open(data, "r+b") as f:  # one flipped byte deep inside fc1's weights
        f.seek(150_000_000)
        byte = f.read(1)
        f.seek(150_000_000)
        f.write(bytes([byte[0] ^ 0x55]))
    damaged = Embedder(ckpt, cache)
    assert damaged.loaded() == ckpt  # TensorFlow's CRC caught it; the checkpoint was read instead
    np.testing.assert_array_equal(damaged.embed(x, "linear"), expected)
    wait_for_copy(copy)  # and a good copy was kept again
    assert Embedder(ckpt, cache).loaded() == copy
    assert checkpoint.fast_copy(checkpoint.write_untrained_checkpoint(tmp_path / "v2.ckpt", v1=False), "x", cache) is None


def test_an_unusable_cache_costs_only_speed(tmp_path, monkeypatch, caplog, model_files, sample_source):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"  # cannot be made
    x = rows(sample_source, 4)
    model = Embedder(model_files["checkpoint"], cache)
    assert model.loaded() == model_files["checkpoint"]
    np.testing.assert_array_equal(model.embed(x, "linear"), Embedder(model_files["checkpoint"], cache).embed(x, "linear"))
    deadline = time.monotonic() + 60
    while "could not keep a V2 copy" not in caplog.text:  # said once, in the background
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_v2_copies_are_few_locked_and_never_half_written(tmp_path, monkeypatch):
    home = tmp_path / "v2"

    def keep(name: str, fail: bool = False) -> bool:
        with checkpoint.writing_copy(home / name) as tmp:
            if tmp is None:
                return False
            for file in checkpoint.copy_files(tmp):
                file.write_text(name)
            if fail:
                raise OSError("disk full")
        return True

    with pytest.raises(OSError):
        keep("a", fail=True)
    assert sorted(p.name for p in home.iterdir()) == ["a.lock"]  # no copy, no temp file
    home.joinpath(".b.999_temp").mkdir()  # left by a writer killed mid-save
    home.joinpath(".b.999.index").write_text("")
    assert keep("b") and not keep("b")  # kept once
    assert not list(home.glob(".*"))
    with open(home / "c.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is writing c
        assert not keep("c")
    assert keep("c") and keep("d")
    assert [checkpoint.has_copy(home / n) for n in "bcd"] == [False, True, True]  # the two last used


def write_partial_checkpoint(path: Path, shapes: dict[str, tuple]) -> Path:
    from worker.runtime import load_tensorflow

    tf = load_tensorflow()
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), tf1.Session(graph=graph) as sess:
        variables = [tf1.get_variable(name, shape=shape) for name, shape in shapes.items()]
        sess.run(tf1.global_variables_initializer())
        tf1.train.Saver(variables, write_version=tf1.train.SaverDef.V1).save(
            sess, str(path), write_meta_graph=False, write_state=False
        )
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such checkpoint"),
        ("directory", "is a directory"),
        ("corrupt", "not a readable TensorFlow checkpoint"),
        ("other_model", "not a VGGish checkpoint"),
        ("wrong_shape", "has shape (3, 3, 1, 32), VGGish needs (3, 3, 1, 64)"),
    ],
)
def test_bad_checkpoints_fail_with_a_clear_error(tmp_path, case, message, fingerprint_cache):
    path = tmp_path / "bad.ckpt"
    if case == "directory":
        path.mkdir()
    elif case == "corrupt":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif case == "other_model":
        write_partial_checkpoint(path, {"resnet/conv1/weights": (3, 3, 1, 64)})
    elif case == "wrong_shape":
        shapes = dict(checkpoint.VARIABLE_SHAPES)
        shapes["vggish/conv1/weights"] = (3, 3, 1, 32)
        shapes["vggish/fc1/fc1_1/weights"] = (1, 1)  # keep the file small; conv1 is checked first
        write_partial_checkpoint(path, shapes)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Embedder(path, fingerprint_cache)


def test_unreadable_weights_fail_with_a_clear_error(tmp_path, fingerprint_cache):
    """The index passes the checks, the data file is cut short: the error comes when the weights load."""
    v2 = checkpoint.write_untrained_checkpoint(tmp_path / "cut.ckpt", seed=0, v1=False)
    data = next(tmp_path.glob("cut.ckpt.data-*"))
    with open(data, "r+b") as f:
        f.truncate(1000)
    model = Embedder(v2, fingerprint_cache)  # names and shapes are fine
    with pytest.raises(CheckpointError, match="cannot restore VGGish"):
        model.loaded()
    with pytest.raises(CheckpointError, match="cannot restore VGGish"):
        model.embed(np.zeros((1, 96, 64)), "relu")


def test_a_rows_bits_do_not_depend_on_how_it_was_chunked(model_files, weights, fingerprint_cache, tmp_path):
    """The worker's own feed (RowReader into a padded, aligned buffer, then embed): rows embedded in
    7-row, 320-row and 1-row chunks give identical bits, as a clip `watch` embeds alone gets the bits
    a batch run gives it. Unpadded, TensorFlow's CPU kernels differ in the last bits by batch size."""
    from reference import vggish

    from vggish_pipeline.core.spectrogram import RowReader

    spectrograms = np.random.default_rng(7).standard_normal((320, 96, 64))
    source = tmp_path / "rows.dat"
    spectrograms.tofile(source)
    model = Embedder(model_files["checkpoint"], fingerprint_cache)
    reader = RowReader()

    def chunked(size: int, start: int, stop: int) -> np.ndarray:
        parts = []
        for first in range(start, stop, size):
            count = min(size, stop - first)
            batch = reader.read(source, first, first + count, model.padded_rows(count))
            assert batch.ctypes.data % 64 == 0 and len(batch) == model.padded_rows(count)
            parts.append(model.embed(batch, "linear", count))
        return np.concatenate(parts)

    whole = chunked(320, 0, 320)
    for size, start, stop in ((7, 0, 28), (7, 292, 320), (1, 0, 2), (1, 158, 160), (1, 318, 320)):  # at the start, inside, at the end
        assert np.array_equal(chunked(size, start, stop), whole[start:stop]), (size, start)
    assert np.array_equal(model.embed(spectrograms[100:107], "linear"), whole[100:107])  # unprepared input is padded too
    assert_close(whole[:32], vggish(weights, spectrograms[:32], relu_embedding=False))
