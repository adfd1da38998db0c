"""VGGish checkpoint files: locating, fingerprinting and checking them, and writing untrained ones.

The public `vggish_model.ckpt` is a TF1 checkpoint in the old V1 format (one file); V2
checkpoints (`PREFIX.index` + `PREFIX.data-*`) load too, and each machine keeps a V2 copy of the
V1 checkpoints it loads, because V2 restores 3-7x faster. Checkpoints written here hold seeded
random weights: they exercise the real loading code but are NOT trained and embed nothing useful.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vggish_pipeline.core.errors import CheckpointError
from vggish_pipeline.core.files import atomic_write
from vggish_pipeline.core.identity import checkpoint_files, checkpoint_prefix
from vggish_pipeline.core.postprocess import PCA_EIGEN_VECTORS, PCA_MEANS
from vggish_pipeline.core.shard import EMBEDDING_SIZE
from worker.runtime import load_tensorflow

VARIABLE_SHAPES: dict[str, tuple[int, ...]] = {}
for _scope, _shape in [
    ("conv1", (3, 3, 1, 64)),
    ("conv2", (3, 3, 64, 128)),
    ("conv3/conv3_1", (3, 3, 128, 256)),
    ("conv3/conv3_2", (3, 3, 256, 256)),
    ("conv4/conv4_1", (3, 3, 256, 512)),
    ("conv4/conv4_2", (3, 3, 512, 512)),
    ("fc1/fc1_1", (12288, 4096)),
    ("fc1/fc1_2", (4096, 4096)),
    ("fc2", (4096, EMBEDDING_SIZE)),
]:
    VARIABLE_SHAPES[f"vggish/{_scope}/weights"] = _shape
    VARIABLE_SHAPES[f"vggish/{_scope}/biases"] = _shape[-1:]

UNTRAINED_MARKER = "vggish_pipeline/untrained_seed"
UNTRAINED_CHECKPOINT = "vggish_untrained.ckpt"
UNTRAINED_PCA = "vggish_untrained_pca_params.npz"


COPIES_KEPT = 2  # 288 MB each


def fast_copy(path: Path, digest: str, cache_dir: Path) -> Path | None:
    """Where this machine keeps a V2 copy of the V1 checkpoint `path`, whose fingerprint is `digest`;
    None for a V2 checkpoint. TensorFlow reads the V1 file in 0.65-2.2 s, most of it page faults in memory it
    takes and frees while parsing, and the same weights from V2 in 0.13-0.31 s. Named by content, the copy
    cannot outlive a change of the original, and V2 stores a CRC of every tensor that restore checks."""
    if checkpoint_files(path)[0].suffix == ".index":
        return None
    return cache_dir / "v2" / digest


def copy_files(prefix: Path) -> tuple[Path, Path]:
    """The (.index, .data) pair a one-shard V2 checkpoint at `prefix` consists of."""
    return prefix.with_name(prefix.name + ".index"), prefix.with_name(prefix.name + ".data-00000-of-00001")


def has_copy(prefix: Path) -> bool:
    """True if the copy is complete (its index is moved in last); marks it as just used."""
    index = copy_files(prefix)[0]
    with contextlib.suppress(OSError):  # a read-only cache is still read
        os.utime(index)
    return index.is_file()


@contextlib.contextmanager
def writing_copy(prefix: Path) -> Iterator[Path | None]:
    """Yield a temporary prefix to save the copy under, then move its files into place; yield None
    if the copy exists or another process is writing it. Keeps the COPIES_KEPT last used copies."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_name(prefix.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released if this process dies
        except BlockingIOError:
            yield None
            return
        for stale in prefix.parent.glob(f".{prefix.name}.*"):  # left by a writer killed mid-way
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if has_copy(prefix):
            yield None
            return
        tmp = prefix.with_name(f".{prefix.name}.{os.getpid()}")
        try:
            yield tmp
            index, data = copy_files(tmp)
            os.replace(data, copy_files(prefix)[1])
            os.replace(index, copy_files(prefix)[0])
        finally:
            for left in copy_files(tmp):
                left.unlink(missing_ok=True)
    used = []
    for index in prefix.parent.glob("[!.]*.index"):
        with contextlib.suppress(FileNotFoundError):  # another process may be pruning too
            used.append((index.stat().st_mtime, index.with_suffix("")))
    for _, old in sorted(used, reverse=True)[COPIES_KEPT:]:
        remove_copy(old)


def remove_copy(prefix: Path) -> None:
    for file in copy_files(prefix):  # index first: a reader never finds an index without its data
        file.unlink(missing_ok=True)


def check_variables(path: Path) -> Any:
    """TensorFlow's CheckpointReader for `path`, after checking that it holds every VGGish variable
    in its shape. Reads the index only, no values."""
    tf = load_tensorflow()

    prefix = checkpoint_prefix(path)
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(str(prefix))
    except Exception as e:  # TensorFlow raises several types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable TensorFlow checkpoint ({first})") from e
    shapes = reader.get_variable_to_shape_map()
    missing = [name for name in VARIABLE_SHAPES if name not in shapes]
    if missing:
        raise CheckpointError(f"{path}: not a VGGish checkpoint: lacks {len(missing)} variables, e.g. {missing[0]}")
    for name, shape in VARIABLE_SHAPES.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{path}: variable {name} has shape {tuple(shapes[name])}, VGGish needs {shape}")
    return reader


def read_variables(path: Path) -> dict[str, np.ndarray]:
    """Every VGGish variable of a checkpoint, after checking names and shapes."""
    reader = check_variables(path)
    return {name: reader.get_tensor(name) for name in VARIABLE_SHAPES}


def is_untrained(reader: Any) -> bool:
    """True for a checkpoint (a `check_variables` reader) written by `write_untrained_checkpoint`."""
    return reader.has_tensor(UNTRAINED_MARKER)


def untrained_weights(seed: int) -> dict[str, np.ndarray]:
    """He-scaled normal weights and small biases, so activations neither vanish nor explode."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in VARIABLE_SHAPES.items():
        if name.endswith("/weights"):
            fan_in = int(np.prod(shape[:-1]))
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)
    return weights


def write_untrained_checkpoint(path: Path, seed: int = 0, v1: bool = True) -> Path:
    """Write a checkpoint in the official layout (V1 by default) with seeded random, UNTRAINED weights."""
    tf = load_tensorflow()

    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf1.get_variable(name, shape=shape, dtype=tf.float32) for name, shape in VARIABLE_SHAPES.items()]
        marker = tf1.get_variable(UNTRAINED_MARKER, initializer=tf.constant(seed, dtype=tf.int64))
        values = untrained_weights(seed)
        with tf1.Session(graph=graph) as sess:
            sess.run(marker.initializer)
            for var in variables:
                var.load(values[var.op.name], sess)
            version = tf1.train.SaverDef.V1 if v1 else tf1.train.SaverDef.V2
            saver = tf1.train.Saver([*variables, marker], write_version=version)
            saver.save(sess, str(path), write_meta_graph=False, write_state=False)
    return path


def write_untrained_pca(path: Path, seed: int = 0) -> Path:
    """PCA params in the official npz layout: an orthogonal 128x128 matrix and a 128x1 mean. UNTRAINED."""
    rng = np.random.default_rng(seed + 1)
    q, _ = np.linalg.qr(rng.standard_normal((EMBEDDING_SIZE, EMBEDDING_SIZE)))
    with atomic_write(path) as f:
        arrays: dict[str, Any] = {PCA_EIGEN_VECTORS: q * 0.3, PCA_MEANS: rng.standard_normal((EMBEDDING_SIZE, 1))}
        np.savez(f, **arrays)
    return path
