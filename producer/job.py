"""A job: which rows of which file, cut into which chunks, embedded in which form, kept in job.json."""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from producer.dataset import Chunk
from worker.errors import InputError
from worker.files import write_json
from worker.jobdir import JobDir
from worker.message import ChunkMessage

MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 1024
CHUNKS_PER_WORKER = 8


def default_chunk_rows(rows: int, workers: int) -> int:
    """Small enough that every worker gets ~8 chunks (a short tail), large enough that per-chunk overhead is noise."""
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, math.ceil(rows / (max(workers, 1) * CHUNKS_PER_WORKER))))


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

    @property
    def dir(self) -> JobDir:
        return JobDir(Path(self.out_dir))

    def shard_path(self, chunk: Chunk) -> Path:
        return self.dir.shard_path(chunk.start, chunk.stop, chunk.digest, self.embedding)

    def message(self, chunk: Chunk) -> ChunkMessage:
        return ChunkMessage(self.id, self.out_dir, self.source, chunk.start, chunk.stop, chunk.digest, self.embedding)

    def missing(self) -> list[Chunk]:
        """Chunks that have no shard yet."""
        return [c for c in self.chunks if not self.shard_path(c).exists()]

    def save(self) -> None:
        record = asdict(self)
        record["chunks"] = [[c.start, c.stop, c.digest] for c in self.chunks]
        write_json(self.dir.job_file, record)

    @classmethod
    def load(cls, out_dir: Path) -> "Job":
        path = JobDir(out_dir).job_file
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: no such job folder")
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{out_dir}: not a job folder (no job.json); run `producer enqueue` first") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: corrupt job record ({e})") from e
        record["chunks"] = [Chunk(*c) for c in record["chunks"]]
        return cls(**record)

    @classmethod
    def load_or_new(cls, out_dir: Path) -> "Job | None":
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
