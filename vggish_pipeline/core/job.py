"""The job: its record (job.json: which rows of which file, cut into which chunks, embedded in
which form), and the folder that producer, workers and finalizer share: job.json, model.json
(the model it is pinned to), shards/, failed/. The folder (local, or a prefix on an object store:
core.store) is the job's source of truth."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, replace

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.message import ChunkMessage
from vggish_pipeline.core.shard import shard_name
from vggish_pipeline.core.spectrogram import OLD_DIGEST
from vggish_pipeline.core.store import Location


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of the source, and the digest of their bytes."""

    start: int
    stop: int
    digest: str

    @property
    def rows(self) -> int:
        return self.stop - self.start


JOB_FILE = "job.json"
MODEL_FILE = "model.json"


@dataclass(frozen=True)
class Failure:
    """A chunk a worker gave up on: its rows, why, and which worker (failed/START-STOP.json)."""

    start: int
    stop: int
    reason: str
    worker: str

    @classmethod
    def read(cls, path: Location) -> Failure | None:
        """The record at `path`; None for one that is unreadable or not a failure record."""
        try:
            record = json.loads(store.read(path))
            return cls(int(record["start"]), int(record["stop"]), str(record["reason"]), str(record["worker"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def as_json(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


class JobDir:
    """Where each piece of a job's state lives in its folder (local, or a prefix on a store), the job's source of truth."""

    def __init__(self, path: Location) -> None:
        self.path = path
        self.job_file = path / JOB_FILE
        self.model_file = path / MODEL_FILE
        self.shards = path / "shards"
        self.failed = path / "failed"

    def ensure(self) -> None:
        """Make the folders (a store has none: a key's prefix is its folder)."""
        if not store.remote(self.path):
            self.shards.mkdir(parents=True, exist_ok=True)
            self.failed.mkdir(exist_ok=True)

    def shard_path(self, start: int, stop: int, digest: str, embedding: str) -> Location:
        return self.shards / shard_name(start, stop, digest, embedding)

    def pinned_model(self) -> str | None:
        try:
            return json.loads(store.read(self.model_file))["fingerprint"]
        except FileNotFoundError:
            return None

    def pin_model(self, fingerprint: str) -> str:
        """Pin the job to a model unless one is pinned already; return the job's model."""
        store.create(self.model_file, json.dumps({"fingerprint": fingerprint}, sort_keys=True).encode())
        return self.pinned_model() or fingerprint

    def repin_model(self, fingerprint: str) -> bool:
        """Pin the job to `fingerprint`, dropping every shard of another model; True if shards were dropped."""
        old = self.pinned_model()
        if old == fingerprint:
            return False
        dropped = False
        if old is not None:
            for name in store.names(self.shards):
                if name.endswith(".npz"):
                    store.remove(self.shards / name)
                    dropped = True
        store.write(self.model_file, as_json({"fingerprint": fingerprint}))
        return dropped

    def _failure_path(self, start: int, stop: int) -> Location:
        return self.failed / f"{start:012d}-{stop:012d}.json"

    def record_failure(self, failure: Failure) -> None:
        store.write(self._failure_path(failure.start, failure.stop), as_json(asdict(failure)))

    def clear_failure(self, start: int, stop: int) -> None:
        store.remove(self._failure_path(start, stop))

    def plans(self, msg: ChunkMessage) -> bool:
        """Whether job.json plans exactly this chunk: only then may a refusal count as its failure
        (a stale or forged message must not poison the job)."""
        try:
            job = Job.read(self.job_file)
        except InputError:
            return False
        return (
            job.id == msg.job and job.source == msg.source and job.embedding == msg.embedding
            and Chunk(msg.start, msg.stop, msg.digest) in job.chunks
        )

    def failures(self) -> list[Failure]:
        records = sorted(name for name in store.names(self.failed) if name.endswith(".json"))
        return [f for f in (Failure.read(self.failed / name) for name in records) if f is not None]


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
        return JobDir(store.location(self.out_dir))

    def shard_name(self, chunk: Chunk) -> str:
        return shard_name(chunk.start, chunk.stop, chunk.digest, self.embedding)

    def shard_path(self, chunk: Chunk) -> Location:
        return self.dir.shards / self.shard_name(chunk)

    def message(self, chunk: Chunk) -> ChunkMessage:
        return ChunkMessage(
            self.id, self.out_dir, self.source, chunk.start, chunk.stop, chunk.digest, self.embedding, digest_scheme=self.digest_scheme
        )

    def shard_names(self) -> set[str]:
        """The shards in the job's folder now, by name: one listing, however many chunks (a stat each
        was most of a watch's refresh at 1,000,000 rows). None yet, or a file in their place: none done."""
        return store.names(self.dir.shards)

    def done(self, chunk: Chunk, present: set[str]) -> bool:
        """Whether `chunk` has its shard among `present` (from shard_names)."""
        return self.shard_name(chunk) in present

    def drop_unused_shards(self) -> None:
        """Remove the shards of chunks this plan does not cut (an earlier plan's, a crash's leftovers)."""
        for name in self.shard_names() - {self.shard_name(c) for c in self.chunks}:
            if name.endswith(".npz"):  # not a shard being written (.tmp)
                store.remove(self.dir.shards / name)

    def missing(self) -> list[Chunk]:
        """Chunks that have no shard yet."""
        present = self.shard_names()
        return [c for c in self.chunks if not self.done(c, present)]

    def failures(self) -> list[Failure]:
        """Failure records of chunks this plan has and that have no shard: a chunk with its shard is
        done, whatever was recorded before, and a record of rows the plan does not cut is stale."""
        missing = {(c.start, c.stop) for c in self.missing()}
        return [f for f in self.dir.failures() if (f.start, f.stop) in missing]

    def save(self) -> None:
        record = asdict(self)
        record["chunks"] = [[c.start, c.stop, c.digest] for c in self.chunks]
        store.write(self.dir.job_file, as_json(record))

    @classmethod
    def read(cls, path: Location) -> Job:
        """The record in job.json at `path`, as written."""
        try:
            record = json.loads(store.read(path))
            record["chunks"] = [Chunk(int(a), int(b), str(d)) for a, b, d in record["chunks"]]
            return cls(**record)
        except FileNotFoundError:
            raise InputError(f"{path.parent}: not a job folder (no job.json); run `producer enqueue` first") from None
        except PermissionError as e:
            raise store.failure(path, e) from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: corrupt job record ({type(e).__name__}: {e})") from e

    @classmethod
    def load(cls, out_dir: Location) -> Job:
        """The job whose folder is `out_dir` (see found_at). Reads only: nothing is written."""
        if not store.remote(out_dir) and not out_dir.is_dir():
            raise InputError(f"{out_dir}: no such job folder")
        return cls.read(JobDir(out_dir).job_file).found_at(out_dir)

    def found_at(self, out_dir: Location) -> Job:
        """The job as found in `out_dir`: a folder moved, renamed or copied since job.json was written
        is this job's folder now, and inputs that were inside the old one are inside this one (a
        folder or a prefix: a job copied from a bucket to a disk is the copy's)."""
        here, then = str(store.resolved(out_dir)), self.out_dir
        if here == then:
            return self
        inside = lambda p: here + p[len(then) :] if p.startswith(then + "/") else p  # noqa: E731
        return replace(self, out_dir=here, source=inside(self.source), csv=inside(self.csv))

    @classmethod
    def load_if_any(cls, out_dir: Location) -> Job | None:
        """The job planned in `out_dir` before, or None if none was."""
        return cls.load(out_dir) if JobDir(out_dir).job_file.exists() else None

    @classmethod
    def new_id(cls) -> str:
        return uuid.uuid4().hex[:12]
