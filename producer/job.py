"""A job: which rows of which file, cut into which chunks, embedded in which form, kept in job.json."""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from producer.dataset import Chunk
from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.files import finish_append, finish_set, write_json
from vggish_pipeline.core.jobdir import Failure, JobDir
from vggish_pipeline.core.message import ChunkMessage
from vggish_pipeline.core.spectrogram import OLD_DIGEST

MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 1024  # for CPU workers (~180 rows/s): ~6 s a chunk
MAX_FAST_CHUNK_ROWS = 4096  # for GPU workers: each holds 3 chunks of float64 in memory (50 MB per 1,024 rows)
CHUNKS_PER_WORKER = 8
CHUNK_SECONDS = 0.05  # of compute per chunk, at least: ~2 ms of per-chunk cost stays under 5 % (BENCHMARKS.md)
GPU_ROWS_PER_S = 80_000  # assumed for GPU workers that have not measured their own speed yet


def default_chunk_rows(rows: int, workers: int, rows_per_s: float | None = None) -> int:
    """Small enough that every worker gets ~8 chunks (a short tail), large enough that per-chunk
    overhead is noise at the workers' speed (rows/s each, when known)."""
    most = MAX_CHUNK_ROWS
    if rows_per_s:
        most = min(MAX_FAST_CHUNK_ROWS, max(MAX_CHUNK_ROWS, 1024 * math.ceil(rows_per_s * CHUNK_SECONDS / 1024)))
    return max(MIN_CHUNK_ROWS, min(most, math.ceil(rows / (max(workers, 1) * CHUNKS_PER_WORKER))))


def fleet_speed(devices: list[str], measured: list[float]) -> float | None:
    """Rows/s to size chunks for: the fastest speed a worker measured, else a guess for GPUs."""
    if measured:
        return max(measured)
    return GPU_ROWS_PER_S if any(d.startswith("GPU") for d in devices) else None


@dataclass
class Job:
    id: str
    out_dir: str
    source: str
    csv: str
    rows: int
    chunk_rows: int
    embedding: str
    chunks: list[Chunk] = field(default_factory=list)
    digest_scheme: str = OLD_DIGEST  # jobs planned before schemes existed used blake2b-128

    @property
    def dir(self) -> JobDir:
        return JobDir(Path(self.out_dir))

    def shard_path(self, chunk: Chunk) -> Path:
        return self.dir.shard_path(chunk.start, chunk.stop, chunk.digest, self.embedding)

    def message(self, chunk: Chunk) -> ChunkMessage:
        return ChunkMessage(
            self.id, self.out_dir, self.source, chunk.start, chunk.stop, chunk.digest, self.embedding, digest_scheme=self.digest_scheme
        )

    def missing(self) -> list[Chunk]:
        """Chunks that have no shard yet."""
        return [c for c in self.chunks if not self.shard_path(c).exists()]

    def failures(self) -> list[Failure]:
        """Failure records of chunks this plan has and that have no shard: a chunk with its shard is
        done, whatever was recorded before, and a record of rows the plan does not cut is stale."""
        missing = {(c.start, c.stop) for c in self.missing()}
        return [f for f in self.dir.failures() if (f.start, f.stop) in missing]

    def save(self) -> None:
        record = asdict(self)
        record["chunks"] = [[c.start, c.stop, c.digest] for c in self.chunks]
        write_json(self.dir.job_file, record)

    @classmethod
    def load(cls, out_dir: Path) -> Job:
        path = JobDir(out_dir).job_file
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: no such job folder")
        finish_set(out_dir)  # outputs whose publication a crash cut short are completed first
        finish_append(out_dir)  # or, if it was an append, cut back
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{out_dir}: not a job folder (no job.json); run `producer enqueue` first") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: corrupt job record ({e})") from e
        record["chunks"] = [Chunk(*c) for c in record["chunks"]]
        return cls(**record).found_at(out_dir)

    def found_at(self, out_dir: Path) -> Job:
        """The job as found in `out_dir`: a folder moved, renamed or copied since job.json was written
        is this job's folder now, and inputs that were inside the old one are inside this one."""
        here, then = Path(os.path.realpath(out_dir)), Path(self.out_dir)
        if here == then:
            return self
        inside = lambda p: str(here / Path(p).relative_to(then)) if Path(p).is_relative_to(then) else p  # noqa: E731
        return replace(self, out_dir=str(here), source=inside(self.source), csv=inside(self.csv))

    @classmethod
    def load_or_new(cls, out_dir: Path) -> Job | None:
        return cls.load(out_dir) if JobDir(out_dir).job_file.exists() else None

    @classmethod
    def new_id(cls) -> str:
        return uuid.uuid4().hex[:12]


def check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file, expected an output folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot create output folder ({e.strerror})") from e
    try:
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise InputError(f"{out_dir}: output folder is not writable ({e.strerror})") from e
