"""The shard format: one chunk's embeddings plus the facts that say which rows and model made them.

A shard is an uncompressed .npz holding `embeddings` (float32, rows x 128) and `meta` (a JSON
string). Its name carries the row range, the rows' fingerprint and the embedding form, so a
shard made from other rows or another form can never be mistaken for the one wanted.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass

import numpy as np

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.store import Location

EMBEDDING_SIZE = 128


@dataclass(frozen=True)
class ShardMeta:
    start: int
    stop: int
    digest: str
    embedding: str
    model: str
    worker: str
    seconds: float

    @property
    def name(self) -> str:
        return shard_name(self.start, self.stop, self.digest, self.embedding)


def shard_name(start: int, stop: int, digest: str, embedding: str) -> str:
    return f"{start:012d}-{stop:012d}-{digest}-{embedding}.npz"


def write_shard(directory: Location, meta: ShardMeta, embeddings: np.ndarray) -> bool:
    """Write atomically and once: False, and nothing written, if the chunk's shard exists by the
    time this one is complete (a worker cut off while others re-ran its chunk): the first one is
    kept, so a shard that a finalize may have read is never replaced (store.create)."""
    if embeddings.shape != (meta.stop - meta.start, EMBEDDING_SIZE):
        raise ValueError(f"embeddings of shape {embeddings.shape} do not fit rows {meta.start}-{meta.stop}")
    data = io.BytesIO()
    np.savez(data, embeddings=embeddings.astype(np.float32, copy=False), meta=np.array(json.dumps(asdict(meta))))
    return store.create(directory / meta.name, data.getvalue())


# What a damaged shard raises as NumPy and json read it: cut off, not a zip, a field missing or extra.
DAMAGE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)


def damaged(path: Location, e: BaseException) -> InputError:
    return InputError(f"{path}: unreadable shard ({type(e).__name__}: {e}); delete it and re-run `producer enqueue`")


def read_shard(path: Location) -> tuple[ShardMeta, np.ndarray]:
    """A shard's facts and embeddings; a damaged one (or one whose contents do not fit its name) is one InputError line."""
    try:
        with np.load(store.opened(path), allow_pickle=False) as npz:
            meta = ShardMeta(**json.loads(str(npz["meta"])))
            embeddings = npz["embeddings"]
    except DAMAGE as e:
        raise damaged(path, e) from e
    if embeddings.shape != (meta.stop - meta.start, EMBEDDING_SIZE) or path.name != meta.name:
        raise damaged(path, ValueError("its contents do not match its name"))
    return meta, embeddings


def read_meta(path: Location) -> ShardMeta:
    """A shard's facts alone; a damaged shard is one InputError line."""
    try:
        with np.load(store.opened(path), allow_pickle=False) as npz:
            return ShardMeta(**json.loads(str(npz["meta"])))
    except DAMAGE as e:
        raise damaged(path, e) from e
