"""Running one chunk: check the message, read only its rows, embed them, write its shard."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.control import inspect_command
from celery.worker.request import Request

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import ChunkRefused, InputError
from vggish_pipeline.core.job import Failure, JobDir
from vggish_pipeline.core.message import INFO_COMMAND, QUEUE, TASK_NAME, ChunkMessage, MessageError, WorkerInfo
from vggish_pipeline.core.metrics import WorkerMetrics
from vggish_pipeline.core.settings import VISIBILITY_DEFAULT
from vggish_pipeline.core.shard import ShardMeta, write_shard
from vggish_pipeline.core.spectrogram import RowReader, digest
from vggish_pipeline.core.store import Location

log = logging.getLogger(__name__)


class Model(Protocol):
    fingerprint: str
    device: str

    def padded_rows(self, count: int) -> int: ...

    def embed(self, rows: np.ndarray, form: str, count: int | None = None) -> np.ndarray: ...


class OtherModel(ChunkRefused):
    """The chunk's job is pinned to a model this worker has not loaded: another worker's chunk."""


class HandedBack(Exception):
    """The worker is stopping and this chunk has not reached the model: it goes back to the queue."""


def inside(path: str, roots: list[Location]) -> Location:
    """`path` (a local path with symlinks and `..` resolved, or a URL) if it lies under one of
    `roots` (folders, or a bucket and prefix); else refuse."""
    try:
        real = store.resolved(store.location(path))
    except InputError as e:
        raise ChunkRefused(str(e)) from e
    if not any(store.within(real, root) for root in roots):
        raise ChunkRefused(f"path {path!r} lies outside the data roots {[str(r) for r in roots]}")
    return real


OTHER_MODEL_PAUSE = 1.0  # seconds before a worker hands back a chunk of a job pinned to another model
GPU_IN_FLIGHT = 3  # chunks a GPU worker works on: one in the model, the others being read or written (BENCHMARKS.md)
# Beyond those, a worker holds one more chunk, read and waiting for the model, so the model never
# waits for a message, a read or a write (BENCHMARKS.md: idle between chunks); a warm stop hands it back.


class ChunkRunner:
    """Everything a worker does per chunk, around its warm model.

    `run` may be called from several threads at once (a worker with chunks in flight): each
    reads into a buffer of its own while another holds the model, so the model waits for no
    read, write or message. Only the model itself is taken one chunk at a time.
    """

    def __init__(
        self, model: Model, roots: list[Location], worker: str, pinned: str | None = None, stopping: Callable[[], bool] = lambda: False,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """`stopping` says whether the worker is on its way out: a chunk not yet in the model is then handed back.
        `metrics`, if given, counts each chunk's outcome."""
        self.model = model
        self.metrics = metrics
        self.roots = [store.resolved(r) for r in roots]
        self.worker = worker
        self.stopping = stopping
        self.stats = WorkerInfo(device=model.device, pinned=pinned, model=model.fingerprint)
        self._model_lock = threading.Lock()
        self._model_free_since: float | None = None  # when the model last finished a chunk
        self._stats_lock = threading.Lock()
        self._readers = threading.local()
        self._busy = 0  # chunks between delivery and their end (in the model, or waiting for it)
        self._idle_since = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the worker last had a chunk (0 while it has one)."""
        with self._stats_lock:
            return 0.0 if self._busy else time.monotonic() - self._idle_since

    def mark_idle(self) -> None:
        """Start the idle clock now (when the worker is ready to take chunks)."""
        with self._stats_lock:
            self._idle_since = time.monotonic()

    def job_dir(self, msg: ChunkMessage) -> JobDir:
        jobdir = JobDir(inside(msg.out_dir, self.roots))
        if not jobdir.job_file.is_file():
            raise ChunkRefused(f"{msg.out_dir} is not a job folder (no job.json)")
        return jobdir

    def read(self, source: Location, msg: ChunkMessage) -> np.ndarray:
        """The chunk's rows, in this thread's buffer, refused unless they are the rows enqueued.
        On a store, only a missing or denied object is a refusal: any other error (a link down
        after s3fs's retries) is retried as the task's error is."""
        reader = getattr(self._readers, "reader", None) or RowReader()
        self._readers.reader = reader
        try:
            rows = reader.read(source, msg.start, msg.stop, self.model.padded_rows(msg.stop - msg.start))
        except (InputError, OSError) as e:
            if store.remote(source) and not isinstance(e, (InputError, FileNotFoundError, PermissionError)):
                raise
            raise ChunkRefused(str(e)) from e
        if digest(rows[: msg.stop - msg.start], msg.digest_scheme) != msg.digest:
            raise ChunkRefused(
                f"{source}: rows {msg.start}-{msg.stop} changed since they were enqueued; re-run `producer enqueue`"
            )
        return rows

    def run(self, payload: dict) -> dict:
        with self._stats_lock:
            self._busy += 1
        outcome = "failed"
        result: dict = {}
        try:
            result = self._run(payload)
            outcome = "skipped" if result.get("skipped") else "dropped" if result.get("dropped") else "embedded"
            return result
        except HandedBack:
            outcome = "handed_back"
            raise
        except OtherModel:
            outcome = "other_model"
            raise
        except ChunkRefused:
            outcome = "refused"
            raise
        finally:
            with self._stats_lock:
                self._busy -= 1
                self._idle_since = time.monotonic()
            if self.metrics is not None:
                rows = result.get("stop", 0) - result.get("start", 0)
                self.metrics.ended(outcome, rows, result.get("seconds"), result.get("idle"))

    def _run(self, payload: dict) -> dict:
        try:
            msg = ChunkMessage.decode(payload)
        except (MessageError, TypeError) as e:
            raise ChunkRefused(f"malformed message: {e}") from e
        jobdir = self.job_dir(msg)
        source = inside(msg.source, self.roots)
        shard = jobdir.shard_path(msg.start, msg.stop, msg.digest, msg.embedding)
        if shard.exists():
            log.info("rows %d-%d: shard exists, skipped", msg.start, msg.stop)
            return {"start": msg.start, "stop": msg.stop, "skipped": True}
        pinned = jobdir.pinned_model() or jobdir.pin_model(self.model.fingerprint)
        if pinned != self.model.fingerprint:
            raise OtherModel(f"job {msg.job} is pinned to model {pinned}; this worker has {self.model.fingerprint} loaded")
        began = time.perf_counter()
        rows = self.read(source, msg)
        read = time.perf_counter() - began
        with self._model_lock:
            if self.stopping():
                raise HandedBack(f"rows {msg.start}-{msg.stop}: the worker is stopping; handed back before the model")
            began = time.perf_counter()
            idle = began - self._model_free_since if self._model_free_since is not None else 0.0
            embeddings = self.model.embed(rows, msg.embedding, msg.stop - msg.start)
            self._model_free_since = time.perf_counter()
            seconds = read + self._model_free_since - began  # the wait for the model is not this chunk's work
        time.sleep(0)  # hand the GIL to the chunk waiting for the model now, not at the next switch (5 ms)
        meta = ShardMeta(msg.start, msg.stop, msg.digest, msg.embedding, self.model.fingerprint, self.worker, seconds)
        if not write_shard(jobdir.shards, meta, embeddings):
            log.warning("rows %d-%d: another worker wrote this chunk's shard meanwhile; this copy is dropped", msg.start, msg.stop)
            return {"start": msg.start, "stop": msg.stop, "dropped": True}
        jobdir.clear_failure(msg.start, msg.stop)
        with self._stats_lock:
            self.stats.chunks += 1
            self.stats.rows += msg.stop - msg.start
            self.stats.seconds += seconds
        log.info("rows %d-%d embedded in %.2fs (%.1f rows/s); the model was idle %.4f s before it",
                 msg.start, msg.stop, seconds, (msg.stop - msg.start) / seconds, idle)
        return {"start": msg.start, "stop": msg.stop, "seconds": seconds, "idle": idle}

    def record_failure(self, payload: dict, reason: str) -> None:
        """Note a chunk's failure in its job folder, if the message is a chunk that job planned.

        A message the job never planned (stale, forged, outside the data roots) is only logged:
        its refusal says nothing about the job's own chunks. A record that cannot be written is
        logged as an error; the producer then gives up on the chunk after a few re-sends.
        """
        try:
            msg = ChunkMessage.decode(payload)
            jobdir = self.job_dir(msg)
        except (MessageError, TypeError, ChunkRefused, OSError):
            return
        if not jobdir.plans(msg):
            log.warning("the refused message is not a chunk job %s planned: nothing recorded", msg.job)
            return
        try:
            jobdir.record_failure(Failure(msg.start, msg.stop, reason, self.worker))
        except Exception as e:  # noqa: BLE001 - a disk's or a store's refusal: the producer gives up after re-sends
            log.error("could not record the failure of rows %d-%d in %s: %s", msg.start, msg.stop, jobdir.failed, e)


@inspect_command(name=INFO_COMMAND)
def worker_info(state) -> dict:
    """Remote-control reply: this worker's device, model and throughput (see `producer status`)."""
    stats = state.consumer.app.conf.get("vggish_stats")
    return stats.encode() if stats else {}


def register(app, runner: ChunkRunner, max_retries: int = 2) -> None:
    """Bind the runner to the Celery task TASK_NAME on `app`: refusals fail at once, other errors retry."""
    app.conf.vggish_stats = runner.stats

    @app.task(name=TASK_NAME, bind=True, max_retries=max_retries, Request=PatientRequest)
    def embed_chunk(task, *args, **payload):
        try:
            if args:
                raise ChunkRefused("message has positional arguments; the schema is keyword-only")
            return runner.run(payload)
        except HandedBack as e:
            log.info("%s", e)
            raise Reject(str(e), requeue=True) from e
        except OtherModel as e:
            # Not this chunk's fault: hand it back for a worker with the job's model (a mixed fleet).
            # The pause keeps a lone wrong worker from spinning on it; `status` names the mismatch.
            log.warning("handed back: %s", e)
            time.sleep(OTHER_MODEL_PAUSE)
            raise Reject(str(e), requeue=True) from e
        except ChunkRefused as e:
            log.error("refused chunk: %s", e)
            runner.record_failure(payload, str(e))
            return {"refused": str(e)}
        except Exception as e:
            if task.request.retries >= max_retries:
                log.exception("chunk failed %d times, giving up", task.request.retries + 1)
                runner.record_failure(payload, f"failed {task.request.retries + 1} times: {type(e).__name__}: {e}")
                raise
            log.warning("chunk failed (%s: %s), retrying", type(e).__name__, e)
            raise task.retry(exc=e, countdown=2) from e


class PatientRequest(Request):
    """A chunk's request that acknowledges until the broker takes it.

    Celery gives up on an ack the broker does not answer (its link cut): kombu logs it, and the
    worker then counts the chunk as held for good, so with one chunk in flight it never takes
    another, even once the link is back. This one tries again, 1, 2, 4… 10 s apart, while the
    message stays Redis' (the visibility timeout) and the worker is not stopping; the chunk's
    shard is written meanwhile.
    """

    acknowledged: bool

    def acknowledge(self) -> None:
        if self.acknowledged:
            return
        patience = self.app.conf.broker_transport_options.get("visibility_timeout", VISIBILITY_DEFAULT)
        began, pause = time.monotonic(), 1.0
        while True:
            try:
                self.message.ack()
                wake_consumer()
                break
            except self._connection_errors as e:
                if told_to_stop() or time.monotonic() - began > patience:  # its message comes back, and is skipped
                    log.warning("left a chunk unacknowledged (%s: %s): its shard is written; its message, back after "
                                "the visibility timeout, will be skipped", type(e).__name__, e)
                    break
                log.warning("the broker is out of reach (%s: %s): acknowledging the chunk again in %.0f s", type(e).__name__, e, pause)
                time.sleep(pause)
                pause = min(2 * pause, 10.0)
        self.acknowledged = True


def wake_consumer() -> None:
    """Let the worker's event loop ask for the next chunk now that an ack freed a place.

    kombu asks Redis for a message (BRPOP) only while the worker holds fewer than it may; once
    it holds that many, nothing is asked, and the loop sleeps in poll until its next timer (up to
    2 s): an ack from a task thread does not wake it. A callback handed to the loop does (kombu's
    waker), and the loop's next turn sends the BRPOP.
    """
    from kombu.asynchronous import get_event_loop

    hub = get_event_loop()
    if hub is not None:
        hub.call_soon(lambda: None)


def told_to_stop(worker=None) -> bool:
    """Whether this worker is on its way out: a signal's warm or cold stop (an exit code once set,
    0 included), or `worker down`, which stops the worker's blueprint without setting either."""
    from celery.bootsteps import CLOSE, TERMINATE

    flags = (worker_state.should_stop, worker_state.should_terminate)
    if any(flag is not None and flag is not False for flag in flags):
        return True
    return worker is not None and getattr(worker.blueprint, "state", None) in (CLOSE, TERMINATE)


def leave_when_idle(runner: ChunkRunner, seconds: float) -> None:
    """Warm-stop this worker (as SIGTERM does) once it has had no chunk for `seconds`."""
    runner.mark_idle()
    while runner.idle_for() < seconds:
        time.sleep(min(0.5, seconds / 4))
    log.info("no chunk for %g s: leaving (--exit-when-idle)", seconds)
    os.kill(os.getpid(), signal.SIGTERM)


def serve(
    app,
    runner: ChunkRunner,
    name: str,
    loglevel: str = "info",
    in_flight: int = 1,
    before_start: Callable[[], None] | None = None,
    exit_when_idle: float | None = None,
) -> int:
    """Run the Celery worker on QUEUE until a warm stop, working on `in_flight` chunks at a time and
    holding one more; `before_start` runs in worker_init, before it connects (so no ping is answered
    and no chunk taken until it returns). A warm stop finishes the chunks in the model or past it,
    hands back those not yet in it, and takes no other. Returns the worker's exit code: non-zero
    after an unrecoverable error (Celery's own CLI would lose it). With `exit_when_idle`, it
    warm-stops once no chunk came for that many seconds after it was ready."""
    from celery.signals import worker_init, worker_ready

    from worker.consumer import quiet_expected_failures

    register(app, runner)
    app.conf.worker_consumer = "worker.consumer:Consumer"
    quiet_expected_failures()
    started: list = []
    runner.stopping = lambda: told_to_stop(started[0] if started else None)

    def init(sender, **_) -> None:
        started.append(sender)
        if before_start is not None:
            before_start()

    worker_init.connect(init, weak=False)
    if exit_when_idle is not None:
        idle = threading.Thread(target=leave_when_idle, args=(runner, exit_when_idle), name="exit-when-idle", daemon=True)
        worker_ready.connect(lambda **_: idle.start(), weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=threads",  # task threads; the main thread keeps answering ping/inspect meanwhile
            f"--concurrency={in_flight + 1}",  # with prefetch multiplier 1: the chunks held, one waiting for the model
            f"--hostname={name}",
            f"--queues={QUEUE}",
            f"--loglevel={loglevel}",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return (started[0].exitcode or 0) if started else 1
