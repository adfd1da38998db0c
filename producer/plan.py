"""Planning a run of a job: which chunks already have a shard that fits, and which must be sent."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from celery import Celery

from producer.dataset import Chunk, scan, validate
from producer.job import Job, check_writable, default_chunk_rows
from vggish_pipeline.core.message import QUEUE, TASK_NAME
from vggish_pipeline.core.spectrogram import NEW_DIGEST


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

    def with_outputs(self, written: dict) -> RunSummary:
        """This summary with finalize's or refresh's result."""
        return replace(self, outputs=written.get("outputs", []), appended=written.get("appended"), seconds=written.get("seconds"))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    job: Job
    send: list[Chunk]
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
            enqueued_rows=sum(c.rows for c in self.send),
            enqueued_chunks=len(self.send),
            dropped_shards_of_other_model=self.dropped_shards,
        )


def plan_job(
    spec: Path,
    frame: Path,
    out_dir: Path,
    embedding: str,
    chunk_rows: int | None,
    workers: int,
    model: str | None,
    unchanged_rows: int = 0,
    before_writing: Callable[[], None] | None = None,
    rows_per_s: float | None = None,
) -> Plan:
    """Validate the inputs, record the job in out_dir, and work out which chunks need a worker.

    A chunk keeps its shard when its rows' bytes, the embedding form and the model are unchanged,
    so re-running on grown or edited inputs sends only what changed. A caller that itself only
    appended to the source passes `unchanged_rows`: chunks below it keep the digests in job.json
    instead of being read and hashed again. `rows_per_s` (each worker's, when known) sizes chunks
    for fast workers. `before_writing` runs after the inputs are checked
    and scanned and before anything is written (e.g. to wait until the model is known good).
    """
    spec, frame, out_dir = (Path(os.path.realpath(p)) for p in (spec, frame, out_dir))
    rows = validate(spec, frame)
    check_writable(out_dir)
    old = Job.load_or_new(out_dir)
    if chunk_rows is None:
        chunk_rows = old.chunk_rows if old else default_chunk_rows(rows, workers, rows_per_s)
    scheme = old.digest_scheme if old else NEW_DIGEST  # a job keeps its scheme, so its shards keep their names
    job = Job(
        id=old.id if old else Job.new_id(),
        out_dir=str(out_dir),
        source=str(spec),
        csv=str(frame),
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
    wanted = {job.shard_path(c).name for c in job.chunks}
    for stale in jobdir.shards.glob("*.npz"):
        if stale.name not in wanted:
            stale.unlink()
    send = job.missing()
    for failure in jobdir.failures():  # every chunk without a shard gets a fresh try
        jobdir.clear_failure(failure.start, failure.stop)
    job.save()
    reused = [c for c in job.chunks if c not in send]
    return Plan(job, send, reused, dropped, jobdir.pinned_model())


def cut(old: Job | None, spec: Path, rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Chunk bounds: the earlier plan's chunks that still lie within the rows, then the rows past
    them in chunks of their own. So rows appended to a source never reopen a chunk that has its
    shard: a refresh after k new rows embeds exactly those k rows."""
    kept = []
    if old is not None and old.source == str(spec) and old.chunk_rows == chunk_rows:
        kept = [(c.start, c.stop) for c in old.chunks if c.stop <= rows]  # a prefix: chunks tile [0, rows)
    start = kept[-1][1] if kept else 0
    return kept + [(a, min(a + chunk_rows, rows)) for a in range(start, rows, chunk_rows)]


def known_digests(old: Job | None, spec: Path, chunk_rows: int, unchanged_rows: int) -> dict[tuple[int, int], str]:
    if old is None or old.source != str(spec) or old.chunk_rows != chunk_rows:
        return {}
    return {(c.start, c.stop): c.digest for c in old.chunks if c.stop <= unchanged_rows}


def send(app: Celery, job: Job, chunks: list[Chunk]) -> None:
    """One small JSON message per chunk: a reference to rows, never the rows."""
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(TASK_NAME, kwargs=job.message(chunk).encode(), queue=QUEUE, producer=producer)
