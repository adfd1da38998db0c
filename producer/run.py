"""Running a job: plan it, send its chunks, wait for the shards (re-sending what is lost), write
the outputs, with this machine's own workers or with a broker's. The CLI and the Python API both
call this; neither holds orchestration of its own."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import UsageError, redact
from vggish_pipeline.core.identity import checkpoint_files, fingerprint, local_checkpoint, model_id
from vggish_pipeline.core.message import DEFAULT_EMBEDDING
from vggish_pipeline.core.settings import CHECKPOINT_ENV, Settings
from vggish_pipeline.core.store import Location, location

if TYPE_CHECKING:
    from celery import Celery

    from producer.dataset import Known
    from producer.plan import Capacity, Plan, RunSummary
    from vggish_pipeline.core.autoscale import Autoscaler
    from vggish_pipeline.core.fleet import Fleet
    from vggish_pipeline.core.job import Chunk, Job
    from vggish_pipeline.core.metrics import ProducerMetrics

DEFAULT_CSV = "wavfile_df.csv"


@dataclass(frozen=True)
class JobInputs:
    """What a run embeds and where: the spectrograms, their frame, the job folder, the model."""

    spec: Location
    csv: Location
    out: Location
    embedding: str = DEFAULT_EMBEDDING
    chunk_rows: int | None = None
    checkpoint: Path | None = None  # on this machine: one on a store is fetched into the cache
    settings: Settings = field(default_factory=Settings)

    @classmethod
    def of(
        cls,
        spec: str | os.PathLike,
        csv: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
        embedding: str = DEFAULT_EMBEDDING,
        chunk_rows: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        settings: Settings | None = None,
    ) -> JobInputs:
        """With the defaults: the CSV beside SPEC, the job folder SPEC's, the checkpoint from the
        settings (VGGISH_CHECKPOINT) unless one is given. Each may be a path or a URL (core.store)."""
        settings = settings or Settings.from_env()
        from vggish_pipeline.core.message import EMBEDDING_FORMS

        source = location(spec)
        if chunk_rows is not None and chunk_rows < 1:
            raise UsageError("--chunk-rows must be at least 1")
        if embedding not in EMBEDDING_FORMS:
            raise UsageError(f"embedding must be one of {', '.join(EMBEDDING_FORMS)}, not {embedding!r}")
        settings = settings.given(checkpoint=location(checkpoint) if checkpoint else None)
        fetched = local_checkpoint(settings.checkpoint, settings.cache_dir) if settings.checkpoint else None
        return cls(
            source, location(csv) if csv else source.parent / DEFAULT_CSV, location(out) if out else source.parent, embedding, chunk_rows,
            fetched, settings,
        )

    def required_checkpoint(self) -> Path:
        """The checkpoint, known to exist; workers check its content as they load it."""
        if self.checkpoint is None:
            raise UsageError(f"no checkpoint: pass --checkpoint or set {CHECKPOINT_ENV}")
        checkpoint_files(self.checkpoint)
        return self.checkpoint

    def check_present(self) -> None:
        """The spectrograms and the CSV are there (a size, a header line): before any worker starts.
        The plan checks them whole (rows, NaNs) while the workers load."""
        from producer.dataset import csv_header
        from vggish_pipeline.core.spectrogram import row_count

        for loc, check in ((self.spec, row_count), (self.csv, csv_header)):
            with store.reporting(loc):
                check(loc)

    def model(self) -> str | None:
        """The model id the job is pinned to: the checkpoint's digest (and +tf32), if one is given."""
        if self.checkpoint is None:
            return None
        return model_id(fingerprint(self.checkpoint, self.settings.cache_dir), self.settings.tf32)

    def data_roots(self) -> list[Location]:
        """Folders (or prefixes) local workers may read and write: the spectrograms' and the job's."""
        return sorted({store.resolved(self.spec.parent), store.resolved(self.out)}, key=str)

    def plan(
        self, capacity: Capacity, model: str | None, *, unchanged_rows: int = 0, known: Known | None = None,
        before_writing: Callable[[], None] | None = None,
    ) -> Plan:
        """Plan the job for `capacity` (chunk sizes follow it unless chunk_rows is given)."""
        from producer.plan import plan_job

        return plan_job(
            self.spec, self.csv, self.out, embedding=self.embedding, chunk_rows=self.chunk_rows, capacity=capacity, model=model,
            unchanged_rows=unchanged_rows, known=known, before_writing=before_writing,
        )


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")


@dataclass
class Crew:
    """The workers a run uses: a broker's (fleet None), or this machine's own on a private Redis."""

    app: Celery
    fleet: Fleet | None
    capacity: Capacity
    metrics: ProducerMetrics | None = None
    scaler: Autoscaler | None = None  # local workers started as the backlog asks (watch --autoscale)

    def ready(self) -> None:
        """Return once a local worker has loaded and checked the checkpoint (at once for a broker's,
        or autoscaled ones: the first starts with the first chunk)."""
        if self.fleet is not None and self.scaler is None:
            from producer.local import first_ready

            first_ready(self.app, self.fleet)

    def enqueue_and_wait(self, job: Job, chunks: list[Chunk], progress: bool = True) -> None:
        """Enqueue `chunks` and wait for their shards, re-sending lost messages; a local worker that
        dies is started again (WorkersDied if it keeps dying)."""
        from producer.plan import enqueue
        from producer.progress import wait
        from producer.recovery import Recovery

        enqueue(self.app, job, chunks)
        recovery = Recovery(self.app, job)

        def check() -> None:
            self.tend()
            recovery()

        wait(job, check=check, show=progress, metrics=self.metrics)

    def tend(self) -> None:
        """Keep the local workers going: start those the backlog asks for (autoscaled), else those that died."""
        if self.scaler is not None:
            self.scaler.fleet.revive_needs()
            self.scaler.step()
        elif self.fleet is not None:
            self.fleet.revive()

    def described(self) -> dict:
        """For the run's summary: the local workers started, or the broker used (password hidden)."""
        if self.fleet is None:
            return {"broker": redact(self.app.conf.broker_url)}
        return {"workers": [m.describe() for m in self.fleet.members]}


@contextlib.contextmanager
def crew(
    inputs: JobInputs, app: Celery | None = None, workers: int | None = None, say: Callable[[str], None] | None = None
) -> Iterator[Crew]:
    """The broker's workers when `app` is given (checked reachable first), else this machine's own:
    a private Redis and one worker per granted GPU (at most `workers`; with none, CPU workers),
    which end with the block however it ends (Ctrl-C included). With the settings' autoscale
    (MIN:MAX), the local workers start and leave as the backlog asks (core.autoscale), saying so to `say`."""
    from producer.plan import Capacity

    if app is not None:  # a broker's workers are scaled where they run (worker up --autoscale): its setting is theirs
        from vggish_pipeline.core import broker

        broker.check_connection(app)
        with producer_metrics(inputs.settings, app) as metrics:
            yield Crew(app, None, remote_capacity(app) if inputs.chunk_rows is None else Capacity(), metrics)
        return
    from producer.local import local_workers

    check_workers(workers)  # usage first, then the files
    ckpt = inputs.required_checkpoint()
    store.check_writable(inputs.out)
    scaled = inputs.settings.autoscale
    with local_workers(ckpt, workers, inputs.data_roots(), worker_logs(inputs), inputs.settings, start=not scaled) as (local_app, fleet):
        capacity = Capacity.of([m.where() for m in fleet.members], [])
        scaler = None
        if scaled:
            from vggish_pipeline.core.autoscale import Autoscaler, scale_range

            low, high = scale_range(scaled, len(fleet.members))
            scaler = Autoscaler(fleet, local_app, low, high, inputs.settings.scale_idle, say=say or print)
        with producer_metrics(inputs.settings, local_app) as metrics:
            yield Crew(local_app, fleet, capacity, metrics, scaler)


def worker_logs(inputs: JobInputs) -> Path:
    """Where local workers' logs go: the job folder's logs/, or the cache's logs/ for a job on a store."""
    return inputs.out / "logs" if isinstance(inputs.out, Path) else inputs.settings.cache_dir / "logs"


@contextlib.contextmanager
def producer_metrics(settings: Settings, app: Celery | None) -> Iterator[ProducerMetrics | None]:
    """With a metrics port: the producer's metrics, served there while the block runs, following `app`'s broker."""
    if settings.metrics_port is None:
        yield None
        return
    from vggish_pipeline.core.metrics import ProducerMetrics

    metrics = ProducerMetrics().serve(settings.metrics_port)
    try:
        if app is not None:
            metrics.follow_broker(app)
        yield metrics
    finally:
        metrics.close()


def remote_capacity(app: Celery) -> Capacity:
    """The broker's live workers: how many, and the rows/s to size chunks for (measured, or a guess for GPUs)."""
    from producer.plan import Capacity
    from vggish_pipeline.core import broker

    live = broker.live_workers(app).values()
    return Capacity.of([w.device for w in live], [w.rows_per_s for w in live if w.rows_per_s])


def run(
    inputs: JobInputs,
    *,
    app: Celery | None = None,
    workers: int | None = None,
    pca_params: Location | None = None,
    progress: bool = True,
    parquet: bool = False,
) -> RunSummary:
    """The whole job: plan, embed, write the outputs, with the broker's workers (`app`) or with
    this machine's own (see `crew`). Returns the summary; shards are kept however it ends."""
    from vggish_pipeline.core.postprocess import PCA

    if app is None:  # usage first, then the files, then the workers
        check_workers(workers)
        inputs.required_checkpoint()
    inputs.check_present()
    pca = PCA(pca_params) if pca_params else None
    with crew(inputs, app, workers) as team:
        # The plan scans the inputs while local workers start. A worker checks the checkpoint as
        # it loads it, and only then may the plan pin the job to it (pinning another model
        # drops the job's shards). This process never imports TensorFlow.
        from producer.finalize import refresh, warm_up  # Arrow loads after the workers are spawned

        warm_up()
        planned = inputs.plan(team.capacity, inputs.model(), before_writing=team.ready)
        job = planned.job
        if progress:
            on = team.fleet.summary() if team.fleet else redact(team.app.conf.broker_url)
            print(f"job {job.id}: {job.rows} rows, {len(planned.to_embed)} chunks to embed "
                  f"({sum(c.rows for c in planned.reused)} rows reused) on {on}", file=sys.stderr)
        team.enqueue_and_wait(job, planned.to_embed, progress)
        if team.fleet is not None:
            team.fleet.signal_stop()  # the workers wind down while finalize runs
        written = refresh(job, pca, parquet)
    return replace(planned.summary().with_outputs(written), **team.described())


def enqueue_job(inputs: JobInputs, app: Celery) -> RunSummary:
    """`producer enqueue`: plan the job for the broker's workers and enqueue what has no shard."""
    from producer.plan import enqueue

    inputs.check_present()
    with crew(inputs, app) as team:
        planned = inputs.plan(team.capacity, inputs.model())
        enqueue(team.app, planned.job, planned.to_embed)
    return replace(planned.summary(), **team.described())
