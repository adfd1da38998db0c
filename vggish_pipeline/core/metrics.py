"""Prometheus metrics: every name, defined here once (README: the metrics table).

A process asked to (`--metrics-port PORT`, VGGISH_METRICS_PORT) serves its own registry at
http://HOST:PORT/metrics: a worker its chunks, a producer (`run`, `wait`, `watch`) the job's
progress, the broker's backlog and the live workers. One prefix, base units (seconds, rows),
`_total` on counters (prometheus-client adds it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vggish_pipeline.core.errors import PipelineError, UsageError

if TYPE_CHECKING:
    from celery import Celery

OUTCOMES = ("embedded", "skipped", "dropped", "handed_back", "other_model", "refused", "failed")
SECOND_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BROKER_POLL = 5.0  # seconds between a producer's looks at the backlog and the live workers


def serve_metrics(registry: Any, port: int) -> Callable[[], None]:
    """Serve `registry` at /metrics on `port` (every address), in a daemon thread; returns what stops it."""
    from prometheus_client import start_http_server

    if not 0 < port < 65536:
        raise UsageError(f"--metrics-port {port}: expected a TCP port, 1 to 65535")
    try:
        server, _ = start_http_server(port, registry=registry)
    except OSError as e:
        raise PipelineError(f"cannot serve metrics on port {port}: {e.strerror or e}") from e

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


class WorkerMetrics:
    """A worker's: rows and chunks (by outcome), each chunk's compute and the model's idle time
    before it, the model's load time, and which worker, device and model this is."""

    def __init__(self, worker: str, device: str, model: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        r = self.registry
        self.rows = Counter("vggish_rows_embedded", "Rows this worker embedded", registry=r)
        self.chunks = Counter("vggish_chunks", "Chunks this worker ended, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.chunks.labels(outcome)  # each outcome shows from the start, at 0
        self.compute = Histogram("vggish_chunk_compute_seconds", "Seconds of a chunk's work: its read, the model, its shard",
                                 buckets=SECOND_BUCKETS, registry=r)
        self.idle = Histogram("vggish_model_idle_seconds", "Seconds the model waited before each chunk", buckets=SECOND_BUCKETS,
                              registry=r)
        self.load = Gauge("vggish_model_load_seconds", "Seconds the model took to load at start", registry=r)
        Info("vggish_worker", "This worker: its name, device and model", registry=r).info(
            {"worker": worker, "device": device, "model": model}
        )

    def ended(self, outcome: str, rows: int = 0, seconds: float | None = None, idle: float | None = None) -> None:
        self.chunks.labels(outcome).inc()
        if outcome == "embedded":
            self.rows.inc(rows)
            if seconds is not None:
                self.compute.observe(seconds)
            if idle is not None:
                self.idle.observe(idle)


class ProducerMetrics:
    """A producer's: the job's rows and chunks (total and done), the broker's backlog (chunks and
    rows that still need a worker: core.broker.backlog) and the live workers."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.rows = Gauge("vggish_job_rows", "Rows of the job being waited for", registry=r)
        self.rows_done = Gauge("vggish_job_rows_done", "Rows of the job that have their embeddings", registry=r)
        self.chunks = Gauge("vggish_job_chunks", "Chunks of the job", registry=r)
        self.chunks_done = Gauge("vggish_job_chunks_done", "Chunks of the job that have their shard", registry=r)
        self.backlog_chunks = Gauge("vggish_backlog_chunks", "Chunks that still need a worker: queued, or delivered and not acknowledged",
                                    registry=r)
        self.backlog_rows = Gauge("vggish_backlog_rows", "Rows of those chunks", registry=r)
        self.live_workers = Gauge("vggish_live_workers", "Workers answering the broker", registry=r)
        self._stop = threading.Event()
        self._closers: list[Callable[[], None]] = []

    def serve(self, port: int) -> ProducerMetrics:
        self._closers.append(serve_metrics(self.registry, port))
        return self

    def close(self) -> None:
        """Stop serving and following the broker (a notebook's next run serves on the same port)."""
        self._stop.set()
        for close in self._closers:
            close()

    def job(self, rows: int, rows_done: int, chunks: int, chunks_done: int) -> None:
        self.rows.set(rows)
        self.rows_done.set(rows_done)
        self.chunks.set(chunks)
        self.chunks_done.set(chunks_done)

    def follow_broker(self, app: Celery) -> None:
        """Look at the backlog and the live workers every BROKER_POLL seconds, in a daemon thread."""
        from vggish_pipeline.core import broker

        def look() -> None:
            while not self._stop.is_set():
                try:
                    backlog = broker.backlog(app)
                    self.backlog_chunks.set(backlog.chunks)
                    self.backlog_rows.set(backlog.rows)
                    self.live_workers.set(len(broker.live_workers(app)))
                except Exception:  # noqa: BLE001 - a broker away or refusing: the last values stand, the next look tries again
                    pass
                self._stop.wait(BROKER_POLL)

        threading.Thread(target=look, name="metrics-broker", daemon=True).start()
