"""The spectrogram file: raw little-endian float64, C order, N examples of 96 frames x 64 mel bands."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from worker.errors import InputError

FRAMES = 96
BANDS = 64
ROW_VALUES = FRAMES * BANDS
ROW_BYTES = ROW_VALUES * 8
DTYPE = np.dtype("<f8")


def row_count(path: Path) -> int:
    """Number of examples in a .dat file, refusing anything that is not a whole number of them."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a .dat file of 96x64 float64 spectrograms")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: file is empty")
    if size % ROW_BYTES:
        raise InputError(
            f"{path}: size {size} bytes is not a multiple of one 96x64 float64 spectrogram ({ROW_BYTES} bytes)"
        )
    return size // ROW_BYTES


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a float64 array of shape (stop-start, 96, 64), reading only those bytes."""
    count = (stop - start) * ROW_VALUES
    with open(path, "rb") as f:
        f.seek(start * ROW_BYTES)
        data = np.fromfile(f, dtype=DTYPE, count=count)
    if data.size != count:
        raise InputError(f"{path}: rows {start}-{stop} lie past the end of the file (was it truncated?)")
    return data.reshape(stop - start, FRAMES, BANDS)


def digest(rows: np.ndarray) -> str:
    """Fingerprint of a block of rows: changes whenever any byte of them does."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(rows)).cast("B"), digest_size=16).hexdigest()


def first_bad_rows(rows: np.ndarray, start: int, limit: int = 5) -> list[int]:
    """Absolute indices of the first rows holding NaN or Inf."""
    bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
    return [start + int(i) for i in np.flatnonzero(bad)[:limit]]


def append_rows(path: Path, rows: np.ndarray) -> None:
    """Append examples to a .dat file and flush them to disk."""
    with open(path, "ab") as f:
        np.ascontiguousarray(rows, dtype=DTYPE).tofile(f)
        f.flush()
        os.fsync(f.fileno())
