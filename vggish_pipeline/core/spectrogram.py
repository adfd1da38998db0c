"""The spectrogram file: raw little-endian float64, C order, N examples of 96 frames x 64 mel bands."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import xxhash

from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.store import Location, read_into

FRAMES = 96
BANDS = 64
ROW_VALUES = FRAMES * BANDS
ROW_BYTES = ROW_VALUES * 8
DTYPE = np.dtype("<f8")


def row_count(path: Location) -> int:
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


def aligned_empty(rows: int) -> np.ndarray:
    """An uninitialised rows x 96 x 64 float64 array whose data starts on a 64-byte boundary:
    TensorFlow feeds such an array as it is, and copies any other first."""
    raw = np.empty(rows * ROW_BYTES + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + rows * ROW_BYTES].view(DTYPE).reshape(rows, FRAMES, BANDS)


class RowReader:
    """Reads rows into one buffer it keeps and reuses, so a worker or a scan does not fault in
    fresh memory for every chunk (50 MB per 1,024 rows). A result is valid until the next read."""

    def __init__(self) -> None:
        self._buffer = aligned_empty(0)

    def read(self, path: Location, start: int, stop: int, padded: int = 0) -> np.ndarray:
        """Rows [start, stop) as float64, shape (stop-start, 96, 64), reading only those bytes (on
        a store, ranged GETs: core.store.read_into); with `padded`, that many rows, zeros after
        the file's: a model's batch, 64-byte aligned."""
        count = stop - start
        total = max(count, padded)
        if len(self._buffer) < total:
            self._buffer = aligned_empty(total)
        data = self._buffer[:count].reshape(-1)
        if read_into(path, start * ROW_BYTES, data.data.cast("B")) != data.nbytes:
            raise InputError(f"{path}: rows {start}-{stop} lie past the end of the file (was it truncated?)")
        self._buffer[count:total] = 0
        return self._buffer[:total]


# How a chunk's rows are fingerprinted. A job keeps the scheme it was planned with (job.json), so
# its chunks keep their shards; new jobs take the fastest. Both give 128 bits as 32 hex digits.
DIGESTS: dict[str, Callable[[memoryview], str]] = {
    "blake2b-128": lambda data: hashlib.blake2b(data, digest_size=16).hexdigest(),  # 1 GB/s here
    "xxh3-128": lambda data: xxhash.xxh3_128_hexdigest(data),  # 23 GB/s here
}
OLD_DIGEST = "blake2b-128"  # jobs and messages that name no scheme
NEW_DIGEST = "xxh3-128"


def digest(rows: np.ndarray, scheme: str = NEW_DIGEST) -> str:
    """Fingerprint of a block of rows: changes whenever any byte of them does."""
    return DIGESTS[scheme](np.ascontiguousarray(rows).data.cast("B"))


def first_bad_rows(rows: np.ndarray, start: int, limit: int = 5) -> list[int]:
    """Absolute indices of the first rows holding NaN or Inf."""
    bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
    return [start + int(i) for i in np.flatnonzero(bad)[:limit]]
