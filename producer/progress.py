"""How far a job is, read from its folder (the source of truth), and a progress line while waiting."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, TextIO

from producer.job import Job
from worker.errors import JobFailed, TimedOut
from worker.shard import read_meta


@dataclass
class Status:
    job: str
    rows_total: int
    rows_done: int
    chunks_total: int
    chunks_done: int
    failed: list[dict] = field(default_factory=list)
    workers: dict[str, dict] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.chunks_done == self.chunks_total

    def to_dict(self) -> dict:
        return asdict(self)


def job_status(job: Job, per_worker: bool = False) -> Status:
    status = Status(job.id, job.rows, 0, len(job.chunks), 0, failed=job.failures())
    workers: dict[str, dict] = defaultdict(lambda: {"chunks": 0, "rows": 0, "seconds": 0.0})
    for chunk in job.chunks:
        path = job.shard_path(chunk)
        if not path.exists():
            continue
        status.rows_done += chunk.rows
        status.chunks_done += 1
        if per_worker:
            meta = read_meta(path)
            w = workers[meta.worker]
            w["chunks"] += 1
            w["rows"] += chunk.rows
            w["seconds"] += meta.seconds
    for w in workers.values():
        w["rows_per_s"] = round(w["rows"] / w["seconds"], 1) if w["seconds"] else None
        w["seconds"] = round(w["seconds"], 2)
    status.workers = dict(workers)
    return status


class Activity:
    """Workers that wrote a shard of this job lately, read from the shards themselves (no broker needed)."""

    def __init__(self, job: Job, window: float = 60.0) -> None:
        self.job = job
        self.window = window
        self.seen = {c.start for c in job.chunks if job.shard_path(c).exists()}  # earlier runs' shards
        self.last_shard: dict[str, float] = {}

    def workers(self) -> int:
        now = time.monotonic()
        for chunk in self.job.chunks:
            if chunk.start not in self.seen and self.job.shard_path(chunk).exists():
                self.seen.add(chunk.start)
                self.last_shard[read_meta(self.job.shard_path(chunk)).worker] = now
        return sum(1 for t in self.last_shard.values() if now - t <= self.window)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(status: Status, rate: float, workers: int | None = None) -> str:
    left = status.rows_total - status.rows_done
    eta = duration(left / rate) if rate > 0 else "?"
    line = (
        f"{status.rows_done:,}/{status.rows_total:,} rows ({100 * status.rows_done / status.rows_total:.0f}%)"
        f"  {rate:.1f} rows/s  ETA {eta}  chunks {status.chunks_done}/{status.chunks_total}"
    )
    if workers is not None:
        line += f"  {workers} worker{'s' * (workers != 1)} active"
    if status.failed:
        line += f"  failed {len(status.failed)}"
    return line


def wait(
    job: Job,
    out: TextIO = sys.stderr,
    interval: float = 0.1,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
) -> Status:
    """Block until every chunk has a shard, showing rows done, rows/s, ETA and the workers that
    wrote a shard in the last minute.

    Stops with an InputError when the only chunks left have failed, or on `timeout`;
    `check` is called every round and may raise to stop the wait (e.g. a local worker died).
    """
    began = time.monotonic()
    first = job_status(job)
    activity = Activity(job)
    tty = out.isatty()
    last_print = 0.0
    while True:
        status = job_status(job)
        elapsed = time.monotonic() - began
        rate = (status.rows_done - first.rows_done) / elapsed if elapsed > 0 else 0.0
        now = time.monotonic()
        if now - last_print >= (1 if tty else 10) or status.done:
            line = progress_line(status, rate, activity.workers())
            out.write(("\r" if tty else "") + line + ("" if tty else "\n"))
            out.flush()
            last_print = now
        if status.done:
            if tty:
                out.write("\n")
            return status
        if status.failed and status.chunks_done + len(status.failed) >= status.chunks_total:
            if tty:
                out.write("\n")
            ranges = ", ".join(f"{f['start']}-{f['stop']} ({f['reason']})" for f in status.failed[:3])
            raise JobFailed(f"{len(status.failed)} chunks failed: rows {ranges}")
        if timeout is not None and elapsed > timeout:
            raise TimedOut(f"timed out after {duration(timeout)} with {status.chunks_total - status.chunks_done} chunks left")
        if check is not None:
            check()
        time.sleep(interval)
