"""Planning a run of a job: which chunks already have a shard that fits, and which must be sent."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from producer.dataset import Known, scan, validate
from producer.outputs import Written
from vggish_pipeline.core import store
from vggish_pipeline.core.job import Chunk, Job
from vggish_pipeline.core.message import DEFAULT_EMBEDDING, QUEUE, TASK_NAME
from vggish_pipeline.core.spectrogram import NEW_DIGEST
from vggish_pipeline.core.store import Location

if TYPE_CHECKING:
    from celery import Celery


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


@dataclass(frozen=True)
class Capacity:
    """The workers a plan sizes chunks for: how many, and each one's rows/s when known."""

    workers: int = 1
    rows_per_s: float | None = None

    @classmethod
    def of(cls, devices: list[str], measured: list[float]) -> Capacity:
        """One worker per device; its speed the fastest a worker measured, else a guess for GPUs."""
        speed = max(measured) if measured else (GPU_ROWS_PER_S if any(d.startswith("GPU") for d in devices) else None)
        return cls(len(devices), speed)

    def chunk_rows(self, rows: int) -> int:
        return default_chunk_rows(rows, self.workers, self.rows_per_s)


@dataclass
class RunSummary:
    """What a run (or enqueue) did: the job, what it reused and sent, and, once written, the outputs."""

    job: str
    out_dir: str
    source: str
    csv: str
    rows: int
    chunks: int
    chunk_rows: int
    embedding: str
    model: str | None
    reused_rows: int
    reused_chunks: int
    enqueued_rows: int
    enqueued_chunks: int
    dropped_shards_of_other_model: bool
    outputs: list[str] = field(default_factory=list)
    appended: bool | None = None  # the outputs grew in place (True) or were written whole (False)
    seconds: float | None = None  # writing the outputs
    workers: list[dict] = field(default_factory=list)  # the local workers started (Member.describe)
    broker: str | None = None  # the broker used, password hidden

    def with_outputs(self, written: Written) -> RunSummary:
        """This summary with finalize's or refresh's result."""
        return replace(self, outputs=written.outputs, appended=written.appended, seconds=written.seconds)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    job: Job
    to_embed: list[Chunk]  # the chunks without a shard that fits
    reused: list[Chunk]
    dropped_shards: bool
    model: str | None

    def summary(self) -> RunSummary:
        return RunSummary(
            job=self.job.id,
            out_dir=self.job.out_dir,
            source=self.job.source,
            csv=self.job.csv,
            rows=self.job.rows,
            chunks=len(self.job.chunks),
            chunk_rows=self.job.chunk_rows,
            embedding=self.job.embedding,
            model=self.model,
            reused_rows=sum(c.rows for c in self.reused),
            reused_chunks=len(self.reused),
            enqueued_rows=sum(c.rows for c in self.to_embed),
            enqueued_chunks=len(self.to_embed),
            dropped_shards_of_other_model=self.dropped_shards,
        )


def plan_job(
    spec: Location,
    csv_path: Location,
    out_dir: Location,
    *,
    embedding: str = DEFAULT_EMBEDDING,
    chunk_rows: int | None = None,
    capacity: Capacity | None = None,
    model: str | None = None,
    unchanged_rows: int = 0,
    known: Known | None = None,
    before_writing: Callable[[], None] | None = None,
) -> Plan:
    """Validate the inputs, record the job in out_dir, and work out which chunks need a worker.

    A chunk keeps its shard when its rows' bytes, the embedding form and the model are unchanged,
    so re-running on grown or edited inputs sends only what changed. A caller that itself only
    appended to the source passes `unchanged_rows`: chunks below it keep the digests in job.json
    instead of being read and hashed again, and `known` (the pair's rows, kept by its one writer)
    spares reading the CSV to count them. Without `chunk_rows`, chunks are sized for `capacity`.
    `before_writing` runs after the inputs are checked and scanned and before anything is written
    (e.g. to wait until the model is known good).
    """
    spec, csv_path, out_dir = (store.resolved(p) for p in (spec, csv_path, out_dir))
    rows = validate(spec, csv_path, known)
    store.check_writable(out_dir)
    old = Job.load_if_any(out_dir)
    if chunk_rows is None:
        chunk_rows = old.chunk_rows if old else (capacity or Capacity()).chunk_rows(rows)
    scheme = old.digest_scheme if old else NEW_DIGEST  # a job keeps its scheme, so its shards keep their names
    job = Job(
        id=old.id if old else Job.new_id(),
        out_dir=str(out_dir),
        source=str(spec),
        csv=str(csv_path),
        rows=rows,
        chunk_rows=chunk_rows,
        embedding=embedding,
        chunks=scan(spec, cut(old, spec, rows, chunk_rows), scheme, known_digests(old, spec, chunk_rows, unchanged_rows)),
        digest_scheme=scheme,
    )
    if before_writing is not None:
        before_writing()
    jobdir = job.dir
    jobdir.ensure()
    dropped = jobdir.repin_model(model) if model else False
    job.drop_unused_shards()
    to_embed = job.missing()
    for failure in jobdir.failures():  # every chunk without a shard gets a fresh try
        jobdir.clear_failure(failure.start, failure.stop)
    job.save()
    reused = [c for c in job.chunks if c not in to_embed]
    return Plan(job, to_embed, reused, dropped, jobdir.pinned_model())


def cut(old: Job | None, spec: Location, rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Chunk bounds: the earlier plan's chunks that still lie within the rows, then the rows past
    them in chunks of their own. So rows appended to a source never reopen a chunk that has its
    shard: a refresh after k new rows embeds exactly those k rows."""
    kept = []
    if old is not None and old.source == str(spec) and old.chunk_rows == chunk_rows:
        kept = [(c.start, c.stop) for c in old.chunks if c.stop <= rows]  # a prefix: chunks tile [0, rows)
    start = kept[-1][1] if kept else 0
    return kept + [(a, min(a + chunk_rows, rows)) for a in range(start, rows, chunk_rows)]


def known_digests(old: Job | None, spec: Location, chunk_rows: int, unchanged_rows: int) -> dict[tuple[int, int], str]:
    if old is None or old.source != str(spec) or old.chunk_rows != chunk_rows:
        return {}
    return {(c.start, c.stop): c.digest for c in old.chunks if c.stop <= unchanged_rows}


def enqueue(app: Celery, job: Job, chunks: list[Chunk]) -> None:
    """One small JSON message per chunk on the queue: a reference to rows, never the rows."""
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(TASK_NAME, kwargs=job.message(chunk).encode(), queue=QUEUE, producer=producer)
