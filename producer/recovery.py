"""Recovery while waiting: re-send chunks whose message is gone, so no fault needs a manual step.

A message vanishes when a worker is killed mid-chunk (Redis only hands its unacked message
back after the visibility timeout, an hour by default) or when Redis restarts without
persistence. A chunk is re-sent when it has no shard and no failure, no shard arrived since the
last check, the queue is empty, and no live worker is running or holding it, on two checks in a
row. While shards keep arriving nothing is asked of the workers, so a healthy job pays nothing.
A chunk that runs twice is harmless: shards are written whole, and a worker skips a chunk
whose shard exists.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import TextIO

from celery import Celery
from celery.exceptions import DuplicateNodenameWarning

from producer.plan import enqueue
from vggish_pipeline.core.broker import live_workers, outage_errors
from vggish_pipeline.core.errors import InputError, JobFailed
from vggish_pipeline.core.job import Job
from vggish_pipeline.core.message import QUEUE, ChunkMessage, MessageError, WorkerInfo


def queue_length(app: Celery) -> int:
    with app.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue=QUEUE).message_count


def held_chunks(app: Celery, job: Job) -> set[int]:
    """Start rows of this job's chunks that live workers are running or have reserved."""
    inspect = app.control.inspect(timeout=0.5)
    held = set()
    with warnings.catch_warnings():  # two workers sharing a name: Celery's 4-line warning on every round
        warnings.simplefilter("ignore", DuplicateNodenameWarning)
        replies = (inspect.active() or {}, inspect.reserved() or {})
    for reply in replies:
        for tasks in reply.values():
            for task in tasks:
                try:
                    msg = ChunkMessage.decode(task.get("kwargs"))
                except MessageError:  # not a chunk message (another app's task on this broker)
                    continue
                if msg.out_dir == job.out_dir:
                    held.add(msg.start)
    return held


def model_note(job: Job, live: dict[str, WorkerInfo]) -> str | None:
    """A line when live workers answer but none has the job's model: its chunks then wait for one."""
    model = job.dir.pinned_model()
    models = sorted({w.model for w in live.values()})
    if not live or model is None or model in models:
        return None
    return f"no live worker has this job's model {model} (they have {', '.join(models)}): its chunks wait for one"


MAX_RESENDS = 3  # of one chunk: past that its fate is an error, not another try
GONE_PATIENCE = 60.0  # seconds a job folder may be away (moved and back) before `wait` gives up on it


class Recovery:
    def __init__(self, app: Celery, job: Job, every: float = 5.0, out: TextIO | None = None) -> None:
        self.app = app
        self.job = job
        self.every = every
        self.out = out or sys.stderr  # as the call finds it (a notebook, pytest's capture), not as at import
        self.last = time.monotonic()
        self.suspects: set[int] = set()
        self.missing_before = -1
        self.resent: dict[int, int] = {}
        self.model_checked = 0.0  # when live workers' models were last compared with the job's
        self.gone_since = 0.0  # when job.json was first found missing
        self.outages = outage_errors()

    def __call__(self) -> None:
        if time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        if not self.job.dir.job_file.exists():  # moved away, perhaps for a moment: re-sending would only be refused
            self.gone_since = self.gone_since or time.monotonic()
            if time.monotonic() - self.gone_since < GONE_PATIENCE:
                return
            raise InputError(
                f"{self.job.out_dir}: the job folder is gone (moved or deleted?); its shards are kept where it is: "
                "run `producer wait` on it there, or `producer run`/`enqueue` where it is now"
            )
        self.gone_since = 0.0
        failed = {f.start for f in self.job.failures()}
        missing = {c.start: c for c in self.job.missing() if c.start not in failed}
        progressed, self.missing_before = len(missing) != self.missing_before, len(missing)
        try:
            if missing and not progressed and time.monotonic() - self.model_checked > 60:  # stalled: other models?
                self.model_checked = time.monotonic()
                note = model_note(self.job, live_workers(self.app))
                if note:
                    self.out.write(f"\n{note}\n")
            if not missing or progressed or queue_length(self.app) > 0:  # shards still coming: nothing is lost yet
                self.suspects = set()
                return
            orphans = set(missing) - held_chunks(self.app, self.job)
        except self.outages as e:  # broker down for now: try again next round
            self.out.write(f"\n(broker unreachable, will retry: {type(e).__name__})\n")
            return
        resend = sorted(orphans & self.suspects)
        self.suspects = orphans - set(resend)
        lost = [s for s in resend if self.resent.get(s, 0) >= MAX_RESENDS]
        if lost:
            rows = ", ".join(f"{missing[s].start}-{missing[s].stop}" for s in lost[:3])
            raise JobFailed(
                f"rows {rows}: re-sent {MAX_RESENDS} times, and still neither a shard nor a failure record "
                "(a worker that dies on them, or cannot write to the job folder: see the workers' logs)"
            )
        for s in resend:
            self.resent[s] = self.resent.get(s, 0) + 1
        if resend:
            enqueue(self.app, self.job, [missing[s] for s in resend])
            n = len(resend)
            self.out.write(
                f"\nre-sent {n} chunk{'s' * (n != 1)} with no shard and no message left "
                "(a worker killed or stopped, a broker restart, or a shard deleted)\n"
            )
