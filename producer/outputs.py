"""A job's outputs: their names, what a finalize or refresh wrote, and reading them back.

`wavfile_embed.dat` (N x 128 float64), `wavfile_embed.csv` (the frame plus e0..e127), with PCA
params `wavfile_embed_pca.dat` (N x 128 uint8), with --parquet `wavfile_embed.parquet`, and
`wavfile_embed.manifest.json`, which says what they hold (see producer.finalize).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.files import SET_JOURNAL
from vggish_pipeline.core.shard import EMBEDDING_SIZE
from vggish_pipeline.core.store import Location

if TYPE_CHECKING:
    from upath import UPath

OUTPUT_DAT = "wavfile_embed.dat"
OUTPUT_CSV = "wavfile_embed.csv"
OUTPUT_PCA = "wavfile_embed_pca.dat"
OUTPUT_PARQUET = "wavfile_embed.parquet"
MANIFEST = "wavfile_embed.manifest.json"
EMBEDDING_COLUMNS = [f"e{i}" for i in range(EMBEDDING_SIZE)]


def output_paths(out: Path, pca: bool) -> list[Path]:
    """The files published together (the manifest aside): the .dat, the CSV and, with PCA, the uint8 .dat."""
    return [out / OUTPUT_DAT, out / OUTPUT_CSV] + ([out / OUTPUT_PCA] if pca else [])


@dataclass(frozen=True)
class Written:
    """What a finalize or a refresh did: the job's rows, the files now up to date, whether they
    grew in place (an append) or were written whole, and how long it took."""

    rows: int
    outputs: list[str] = field(default_factory=list)
    appended: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def mapped(source: Path | BinaryIO, rows: int, dtype: str | type = "<f8") -> np.ndarray:
    """rows x 128 of `dtype`, memory-mapped read-only from a file (a path, or one held open)."""
    return np.memmap(source, dtype=dtype, mode="r", shape=(rows, EMBEDDING_SIZE))


def embeddings(out: Path, rows: int) -> np.ndarray:
    """N x 128 float64, memory-mapped read-only from wavfile_embed.dat."""
    return mapped(out / OUTPUT_DAT, rows)


def read_manifest(out: Location) -> dict | None:
    """What the outputs hold, from their manifest (written whole, so never half of one); None
    without outputs or with an unreadable manifest (a finalize writes it again)."""
    try:
        record = json.loads(store.read(out / MANIFEST))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class Prefix(io.RawIOBase):
    """The first `size` bytes of an open file, read with pread: what a snapshot holds of a file that may grow."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.fd, self.size, self.pos = f.fileno(), size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        data = os.pread(self.fd, min(len(buffer), self.size - self.pos), self.pos) if self.pos < self.size else b""
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass
class Snapshot:
    """One complete set of a job's outputs, as its manifest names it, held open: the rows it has
    read the same while a watch appends to the files (they are read only as far as the manifest
    says) or a finalize replaces them (the open files are the old set's). Close it when done."""

    out: Location  # where the set is: a local folder, or a store's prefix it was copied from
    rows: int
    sizes: dict[str, int]
    files: dict[str, BinaryIO]

    def embeddings(self) -> np.ndarray:
        """N x 128 float64, memory-mapped read-only from this set's wavfile_embed.dat."""
        if not self.rows:  # a file of no bytes cannot be mapped
            return np.zeros((0, EMBEDDING_SIZE))
        return mapped(self.files[OUTPUT_DAT], self.rows)

    def pca_codes(self) -> np.ndarray | None:
        """N x 128 uint8 from this set's wavfile_embed_pca.dat, if the job wrote one."""
        if OUTPUT_PCA not in self.files or not self.rows:
            return None
        return mapped(self.files[OUTPUT_PCA], self.rows, np.uint8)

    def csv(self) -> BinaryIO:
        """This set's wavfile_embed.csv, as far as the manifest says it goes, from its start."""
        return io.BufferedReader(Prefix(self.files[OUTPUT_CSV], self.sizes[OUTPUT_CSV]))

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def snapshot(out: Location, timeout: float = 30.0) -> Snapshot:
    """The outputs in `out` as one complete set (see Snapshot), whatever is writing them now.

    The manifest is read, the files it names are opened, and the manifest is read again: if it is
    the same and no set is being published (its journal absent, before and after), the open files
    are the set it describes. Else, a moment later, again. A job folder on a store: see `fetched`.
    """
    if not isinstance(out, Path):
        return fetched(out, timeout)
    deadline = time.monotonic() + timeout
    while True:
        publishing = (out / SET_JOURNAL).exists()
        try:
            manifest = (out / MANIFEST).read_bytes()
            record = json.loads(manifest)
            rows, sizes = int(record["rows"]), {str(name): int(size) for name, size in record["sizes"].items()}
        except FileNotFoundError:
            raise InputError(f"{out}: no outputs yet (no {MANIFEST}); run `producer finalize {out}`") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{out / MANIFEST}: unreadable ({type(e).__name__}: {e}); `producer finalize {out}` writes it again") from e
        files: dict[str, BinaryIO] = {}
        with contextlib.ExitStack() as opened:
            with contextlib.suppress(FileNotFoundError):
                for name in sizes:
                    files[name] = opened.enter_context(open(out / name, "rb"))
            whole = len(files) == len(sizes) and all(os.fstat(f.fileno()).st_size >= sizes[name] for name, f in files.items())
            if not publishing and whole and (out / MANIFEST).read_bytes() == manifest and not (out / SET_JOURNAL).exists():
                opened.pop_all()
                return Snapshot(out, rows, sizes, files)
        if time.monotonic() > deadline:
            raise InputError(
                f"{out}: no complete set of outputs for {timeout:g} s: they kept changing, or a write of them was cut short "
                f"(if nothing writes them, `producer finalize {out}` completes it)"
            )
        time.sleep(0.01)


def fetched(out: UPath, timeout: float = 30.0) -> Snapshot:
    """The outputs of a job folder on a store as one complete set, copied to this machine: the
    manifest, each object it names, each then still at the ETag it names (its content as published
    with that manifest), and the manifest again unchanged; else a set was being published meanwhile:
    again. The copies are held open, their folder gone."""
    deadline = time.monotonic() + timeout
    while True:
        with tempfile.TemporaryDirectory(prefix="vggish-outputs-") as staging:
            local = Path(staging)
            try:
                manifest = store.read(out / MANIFEST)
                record = json.loads(manifest)
                sizes = {str(name): int(size) for name, size in record["sizes"].items()}
                for name in sizes:
                    out.fs.get_file((out / name).path, str(local / name))
                same = all(store.etag(out / name) == record["etags"][name] for name in sizes)
            except FileNotFoundError:
                raise InputError(f"{out}: no outputs yet (no {MANIFEST}); run `producer finalize {out}`") from None
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{out / MANIFEST}: unreadable ({type(e).__name__}: {e}); `producer finalize {out}` "
                                 "writes it again") from e
            except OSError as e:
                if e.errno != errno.EBUSY:  # s3fs's word for an object replaced while it was read: again
                    raise
                same = False
            if same and all((local / name).stat().st_size == size for name, size in sizes.items()) \
                    and store.read(out / MANIFEST) == manifest:
                (local / MANIFEST).write_bytes(manifest)
                return replace(snapshot(local), out=out)
        if time.monotonic() > deadline:
            raise InputError(f"{out}: no complete set of outputs for {timeout:g} s: they kept changing")
        time.sleep(0.5)
