"""How far a job is, read from its folder (the source of truth), and a progress line while waiting."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TextIO

from producer.outputs import read_manifest
from vggish_pipeline.core.errors import JobFailed, TimedOut
from vggish_pipeline.core.job import Failure, Job
from vggish_pipeline.core.message import Throughput
from vggish_pipeline.core.metrics import ProducerMetrics
from vggish_pipeline.core.shard import read_meta
from vggish_pipeline.core.store import Location


@dataclass
class Status:
    job: str
    rows_total: int
    rows_done: int
    chunks_total: int
    chunks_done: int
    failed: list[Failure] = field(default_factory=list)
    workers: dict[str, Throughput] = field(default_factory=dict)  # by worker name, with per_worker
    outputs_rows: int | None = None  # the rows of the last complete set of outputs (its manifest's); None: none yet

    @property
    def done(self) -> bool:
        return self.chunks_done == self.chunks_total

    def to_dict(self) -> dict:
        return {**asdict(self), "workers": {name: share.to_dict() for name, share in self.workers.items()}}


def job_status(job: Job, per_worker: bool = False) -> Status:
    status = Status(job.id, job.rows, 0, len(job.chunks), 0, failed=job.failures())
    workers: dict[str, Throughput] = defaultdict(Throughput)
    present = job.shard_names()
    for chunk in job.chunks:
        if not job.done(chunk, present):
            continue
        status.rows_done += chunk.rows
        status.chunks_done += 1
        if per_worker:
            meta = read_meta(job.shard_path(chunk))
            share = workers[meta.worker]
            share.chunks += 1
            share.rows += chunk.rows
            share.seconds += meta.seconds
    status.workers = dict(workers)
    status.outputs_rows = outputs_rows(job.dir.path)
    return status


def outputs_rows(out: Location) -> int | None:
    """The rows the outputs' manifest names: the last complete set's, even mid-append."""
    held = read_manifest(out)
    return held.get("rows") if held is not None else None


class Activity:
    """Workers that wrote a shard of this job lately, read from the shards themselves (no broker needed)."""

    def __init__(self, job: Job, window: float = 60.0) -> None:
        self.job = job
        self.window = window
        present = job.shard_names()
        self.seen = {c.start for c in job.chunks if job.done(c, present)}  # earlier runs' shards
        self.last_shard: dict[str, float] = {}

    def workers(self) -> int:
        now = time.monotonic()
        present = self.job.shard_names()
        for chunk in self.job.chunks:
            if chunk.start not in self.seen and self.job.done(chunk, present):
                self.seen.add(chunk.start)
                self.last_shard[read_meta(self.job.shard_path(chunk)).worker] = now
        return sum(1 for t in self.last_shard.values() if now - t <= self.window)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def counted(done: int, total: int, unit: str, rate: float) -> str:
    """"1,234/5,000 files (25%)  12.3 files/s  ETA 5m02s"."""
    eta = duration((total - done) / rate) if rate > 0 else "?"
    return f"{done:,}/{total:,} {unit} ({100 * done / max(total, 1):.0f}%)  {rate:.1f} {unit}/s  ETA {eta}"


def progress_line(status: Status, rate: float, workers: int | None = None) -> str:
    line = counted(status.rows_done, status.rows_total, "rows", rate) + f"  chunks {status.chunks_done}/{status.chunks_total}"
    if workers is not None:
        line += f"  {workers} worker{'s' * (workers != 1)} active"
    if status.failed:
        line += f"  failed {len(status.failed)}"
    return line


class Display:
    """Where progress goes: a tqdm bar (tqdm.auto: a widget in Jupyter, a bar on a terminal), or,
    for logs and pipes, a plain line every 10 s; or nowhere."""

    def __init__(self, out: TextIO, show: bool, total: int, done: int = 0, unit: str = "rows") -> None:
        self.out = out
        self.show = show
        self.last = 0.0
        self.bar = None
        if show and (out.isatty() or "ipykernel" in sys.modules):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, unit_scale=True, file=out, dynamic_ncols=True)

    def update(self, done: int, postfix: str, line: str, final: bool = False) -> None:
        """`done` so far; `postfix` beside the bar; `line` the plain line for a log."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(postfix, refresh=False)
        elif self.show and (final or time.monotonic() - self.last >= 10):
            self.out.write(line + "\n")
            self.out.flush()
            self.last = time.monotonic()

    def write(self, line: str) -> None:
        """A line of its own, above the bar."""
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            self.out.write(line + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait(
    job: Job,
    out: TextIO | None = None,
    interval: float = 0.1,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
    show: bool = True,
    metrics: ProducerMetrics | None = None,
) -> Status:
    """Block until every chunk has a shard, showing rows done, rows/s, ETA and the workers that
    wrote a shard in the last minute (unless `show` is off).

    Stops with an InputError when the only chunks left have failed, or on `timeout`;
    `check` is called every round and may raise to stop the wait (e.g. a local worker died).
    """
    began = time.monotonic()
    first = job_status(job)
    activity = Activity(job)
    display = Display(out or sys.stderr, show, first.rows_total, first.rows_done)
    try:
        while True:
            status = job_status(job)
            elapsed = time.monotonic() - began
            rate = (status.rows_done - first.rows_done) / elapsed if elapsed > 0 else 0.0
            workers = activity.workers()
            postfix = f"chunks {status.chunks_done}/{status.chunks_total}, {workers} worker{'s' * (workers != 1)} active"
            postfix += f", failed {len(status.failed)}" if status.failed else ""
            display.update(status.rows_done, postfix, progress_line(status, rate, workers), final=status.done)
            if metrics is not None:
                metrics.job(status.rows_total, status.rows_done, status.chunks_total, status.chunks_done)
            if status.done:
                return status
            if status.failed and status.chunks_done + len(status.failed) >= status.chunks_total:
                ranges = ", ".join(f"{f.start}-{f.stop} ({f.reason})" for f in status.failed[:3])
                raise JobFailed(f"{len(status.failed)} chunks failed: rows {ranges}")
            if timeout is not None and elapsed > timeout:
                raise TimedOut(f"timed out after {duration(timeout)} with {status.chunks_total - status.chunks_done} chunks left")
            if check is not None:
                check()
            time.sleep(interval)
    finally:
        display.close()
