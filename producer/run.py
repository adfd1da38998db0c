"""Running a job: plan it, send its chunks, wait for the shards (re-sending what is lost), write
the outputs, with this machine's own workers or with a broker's. The CLI and the Python API both
call this; neither holds orchestration of its own."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vggish_pipeline.core.errors import UsageError, redact
from vggish_pipeline.core.identity import checkpoint_files, fingerprint, model_id
from vggish_pipeline.core.settings import CHECKPOINT_ENV, Settings

if TYPE_CHECKING:
    from celery import Celery

    from producer.dataset import Chunk
    from producer.job import Job
    from producer.plan import Plan, RunSummary
    from vggish_pipeline.core.fleet import Fleet

DEFAULT_CSV = "wavfile_df.csv"


@dataclass(frozen=True)
class JobInputs:
    """What a run embeds and where: the spectrograms, their frame, the job folder, the model."""

    spec: Path
    csv: Path
    out: Path
    embedding: str = "relu"
    chunk_rows: int | None = None
    checkpoint: Path | None = None
    settings: Settings = field(default_factory=Settings)

    @classmethod
    def of(
        cls,
        spec: str | os.PathLike,
        csv: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
        embedding: str = "relu",
        chunk_rows: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        settings: Settings | None = None,
    ) -> JobInputs:
        """With the defaults: the CSV beside SPEC, the job folder SPEC's, the checkpoint from VGGISH_CHECKPOINT."""
        settings = settings or Settings.from_env()
        from vggish_pipeline.core.message import EMBEDDING_FORMS

        spec = Path(spec)
        if chunk_rows is not None and chunk_rows < 1:
            raise UsageError("--chunk-rows must be at least 1")
        if embedding not in EMBEDDING_FORMS:
            raise UsageError(f"embedding must be one of {', '.join(EMBEDDING_FORMS)}, not {embedding!r}")
        checkpoint = checkpoint or settings.checkpoint
        return cls(
            spec,
            Path(csv) if csv else spec.parent / DEFAULT_CSV,
            Path(out) if out else spec.parent,
            embedding,
            chunk_rows,
            Path(checkpoint) if checkpoint else None,
            settings,
        )

    def required_checkpoint(self) -> Path:
        """The checkpoint, known to exist; workers check its content as they load it."""
        if self.checkpoint is None:
            raise UsageError(f"no checkpoint: pass --checkpoint or set {CHECKPOINT_ENV}")
        checkpoint_files(self.checkpoint)
        return self.checkpoint

    def model(self) -> str | None:
        """The model id the job is pinned to: the checkpoint's digest (and +tf32), if one is given."""
        if self.checkpoint is None:
            return None
        return model_id(fingerprint(self.checkpoint, self.settings.cache_dir), self.settings.tf32)

    def data_roots(self) -> list[Path]:
        """Folders local workers may read and write: the spectrograms' and the job's."""
        return sorted({Path(os.path.realpath(self.spec.parent)), Path(os.path.realpath(self.out))})

    def plan(
        self,
        workers: tuple[int, float | None],
        model: str | None,
        unchanged_rows: int = 0,
        before_writing: Callable[[], None] | None = None,
    ) -> Plan:
        """Plan the job for `workers`: how many, and the rows/s of each when known (chunk sizes follow both)."""
        from producer.plan import plan_job

        count, speed = workers
        return plan_job(
            self.spec, self.csv, self.out, self.embedding, self.chunk_rows, count, model, unchanged_rows, before_writing, speed
        )


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")


def remote_capacity(app: Celery) -> tuple[int, float | None]:
    """The broker's live workers: how many, and the rows/s to size chunks for (measured, or a guess for GPUs)."""
    from producer.job import fleet_speed
    from vggish_pipeline.core import broker

    live = broker.live_workers(app)
    measured = [w["rows_per_s"] for w in live.values() if w.get("rows_per_s")]
    return len(live), fleet_speed([str(w.get("device")) for w in live.values()], measured)


def local_capacity(fleet: Fleet) -> tuple[int, float | None]:
    """This command's own workers: how many, and the rows/s to size chunks for (a guess for GPUs)."""
    from producer.job import fleet_speed

    return len(fleet.members), fleet_speed([m.where() for m in fleet.members], [])


def embed(app: Celery, job: Job, chunks: list[Chunk], fleet: Fleet | None, progress: bool = True) -> None:
    """Send `chunks` and wait for their shards, re-sending lost messages; a local worker that dies
    is started again (WorkersDied if it keeps dying)."""
    from producer.plan import send
    from producer.progress import wait
    from producer.recovery import Recovery

    send(app, job, chunks)
    recovery = Recovery(app, job)

    def check() -> None:
        if fleet is not None:
            fleet.revive()
        recovery()

    wait(job, check=check, show=progress)


def run_local(
    inputs: JobInputs, workers: int | None = None, pca_params: Path | None = None, progress: bool = True, parquet: bool = False
) -> RunSummary:
    """The whole job on this machine: a private Redis, one worker per granted GPU (at most
    `workers`; with none, CPU workers), plan, embed, write the outputs. Returns the summary.
    Everything it starts ends with it, however it ends (Ctrl-C included); shards are kept."""
    from producer.job import check_writable
    from producer.local import first_ready, local_workers
    from vggish_pipeline.core.postprocess import PCA

    check_workers(workers)  # usage first, then the files
    ckpt = inputs.required_checkpoint()
    pca = PCA(pca_params) if pca_params else None
    check_writable(inputs.out)  # it takes the workers' logs
    with local_workers(ckpt, workers, inputs.data_roots(), inputs.out / "logs", inputs.settings) as (app, fleet):
        # The plan scans the inputs while the workers start. A worker checks the checkpoint as
        # it loads it, and only then may the plan pin the job to it (pinning another model
        # drops the job's shards). This process never imports TensorFlow.
        from producer.finalize import refresh, warm_up  # Arrow loads after the workers are spawned

        warm_up()
        planned = inputs.plan(local_capacity(fleet), inputs.model(), before_writing=lambda: first_ready(app, fleet))
        job = planned.job
        if progress:
            print(
                f"job {job.id}: {job.rows} rows, {len(planned.send)} chunks to embed "
                f"({sum(c.rows for c in planned.reused)} rows reused) on {fleet.summary()}",
                file=sys.stderr,
            )
        embed(app, job, planned.send, fleet, progress)
        fleet.signal_stop()  # the workers wind down while finalize runs
        result = refresh(job, pca, parquet)
    return replace(planned.summary().with_outputs(result), workers=[m.describe() for m in fleet.members])


def run_remote(
    inputs: JobInputs, app: Celery, pca_params: Path | None = None, progress: bool = True, parquet: bool = False
) -> RunSummary:
    """The whole job with the broker's workers: enqueue, wait (re-sending what is lost), write the outputs."""
    from producer.finalize import refresh
    from vggish_pipeline.core import broker
    from vggish_pipeline.core.postprocess import PCA

    pca = PCA(pca_params) if pca_params else None
    broker.check_connection(app)
    planned = inputs.plan(remote_capacity(app) if inputs.chunk_rows is None else (1, None), inputs.model())
    embed(app, planned.job, planned.send, None, progress)
    return replace(planned.summary().with_outputs(refresh(planned.job, pca, parquet)), broker=redact(app.conf.broker_url))
