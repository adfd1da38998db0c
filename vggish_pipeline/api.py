"""The Python API: the jobs of `producer run`, `add-clips`, `status` and `watch`, as calls that
return values and raise the project's own exceptions (vggish_pipeline.core.errors), never SystemExit."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from producer import outputs
from producer.compact import COMPACT_AFTER
from producer.run import JobInputs, run
from vggish_pipeline.core import store
from vggish_pipeline.core.errors import as_pipeline_error
from vggish_pipeline.core.message import DEFAULT_EMBEDDING
from vggish_pipeline.core.settings import Settings

if TYPE_CHECKING:
    import pandas as pd

    from producer.plan import RunSummary
    from producer.progress import Status
    from producer.watcher import WatchLoop

PathLike = str | os.PathLike
F = TypeVar("F", bound=Callable[..., Any])


def own_errors(call: F) -> F:
    """OS failures and the broker client's errors leave as the project's exceptions, one line each."""

    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as e:
            error = as_pipeline_error(e)
            if error is None or error is e:
                raise
            raise error from e

    return wrapped  # type: ignore[return-value]


class Result:
    """A job's outputs as one complete set (outputs.Snapshot), held open: what it reads stays the
    same while a watch appends to the files or a finalize replaces them. `rows` is the set's."""

    def __init__(self, snapshot: outputs.Snapshot, summary: RunSummary | None = None) -> None:
        self.snapshot = snapshot
        self.out_dir = snapshot.out
        self.rows = snapshot.rows
        self.summary = summary  # what the run did, for a Result that `embed` returns

    @property
    def embeddings(self) -> np.ndarray:
        """N x 128 float64, memory-mapped from wavfile_embed.dat (read-only)."""
        return self.snapshot.embeddings()

    @property
    def pca(self) -> np.ndarray | None:
        """N x 128 uint8 from wavfile_embed_pca.dat, if the job wrote one."""
        return self.snapshot.pca_codes()

    def frame(self) -> pd.DataFrame:
        """The seed's DataFrame: the input frame's columns (its unnamed index column as the index),
        then e0..e127, taken from the .dat so they equal it bit for bit."""
        import csv
        import io

        import pandas as pd

        from producer.dataset import index_column

        header = next(csv.reader(io.TextIOWrapper(self.snapshot.csv(), newline="")))
        inputs = [i for i, name in enumerate(header) if name not in outputs.EMBEDDING_COLUMNS]
        frame = pd.read_csv(self.snapshot.csv(), usecols=inputs, index_col=index_column(header))
        embeddings = pd.DataFrame(np.asarray(self.embeddings), columns=outputs.EMBEDDING_COLUMNS, index=frame.index)
        return pd.concat([frame, embeddings], axis=1)

    def close(self) -> None:
        self.snapshot.close()

    def __enter__(self) -> Result:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@own_errors
def result(out_dir: PathLike | store.Location) -> Result:
    """The outputs in `out_dir` as one complete set, safe to read while a watch appends to them
    (from a job folder on a store: copied here first, see outputs.fetched)."""
    return Result(outputs.snapshot(store.location(out_dir)))


@own_errors
def embed(
    spec: PathLike,
    checkpoint: PathLike | None = None,
    *,
    csv: PathLike | None = None,
    out: PathLike | None = None,
    workers: int | None = None,
    broker: str | None = None,
    embedding: str = DEFAULT_EMBEDDING,
    pca_params: PathLike | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
    parquet: bool = False,
) -> Result:
    """`producer run` as a call: embed SPEC's rows (the CSV beside it by default) and write the
    outputs into its folder (or `out`). Without `broker`, a private Redis and one worker per granted
    GPU (at most `workers`; with none, CPU workers) run inside this call and end with it, even on
    KeyboardInterrupt (shards are kept: call again to go on). With `broker` (a Redis URL), that
    broker's workers do the work. A job folder that has the shards already only does what is new."""
    from vggish_pipeline.core.broker import broker_url, make_app

    settings = Settings.from_env().given(broker_url=broker)
    inputs = JobInputs.of(spec, csv, out, embedding, chunk_rows, checkpoint, settings)
    app = make_app(broker_url(settings), settings) if broker else None
    pca = store.location(pca_params) if pca_params else None
    summary = run(inputs, app=app, workers=workers, pca_params=pca, progress=progress, parquet=parquet)
    return Result(outputs.snapshot(store.location(summary.out_dir)), summary)


@own_errors
def add_clips(
    recordings: PathLike | list[PathLike],
    spec: PathLike,
    *,
    csv: PathLike | None = None,
    label: str | None = None,
    label_from_folder: bool = False,
    valid: bool = False,
    pad: bool = False,
    rows_per_file: int | None = None,
    valid_list: PathLike | None = None,
    bad_files: PathLike | None = None,
    jobs: int | None = None,
) -> dict:
    """`producer add-clips`: append recordings (files or folders; WAV, FLAC, OGG, MP3…) to SPEC and
    its CSV, converted on `jobs` processes (default: every usable core). All or nothing, unless
    `bad_files` names a report for the refused files (the summary's files_refused counts them).
    Returns the summary (files and rows added)."""
    from producer.clips import ClipOptions, add_files

    paths = [Path(r) for r in (recordings if isinstance(recordings, list) else [recordings])]
    inputs = JobInputs.of(spec, csv)
    options = ClipOptions(label, label_from_folder, valid, pad, rows_per_file, Path(valid_list) if valid_list else None)
    spec, csv_path = (store.local(p, "add_clips (it appends)") for p in (inputs.spec, inputs.csv))
    return add_files(spec, csv_path, paths, options, bad_files=Path(bad_files) if bad_files else None, jobs=jobs)


@own_errors
def status(out_dir: PathLike) -> Status:
    """How far the job in `out_dir` is: rows and chunks done, failures, chunks per worker."""
    from producer.progress import job_status
    from vggish_pipeline.core.job import Job

    return job_status(Job.load(store.location(out_dir)), per_worker=True)


class Watch:
    """A `producer watch` running in a background thread, to start and stop from notebook cells."""

    def __init__(self, watcher: WatchLoop) -> None:
        self.watcher = watcher
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vggish-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            own_errors(self.watcher.run)()
        except BaseException as e:  # kept for stop() to raise in the caller's thread
            self.error = e

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def refreshes(self) -> int:
        """How many times the outputs were brought up to date so far."""
        return self.watcher.refreshes

    @property
    def rows(self) -> int:
        """The rows the outputs hold after the last refresh (0 before the first): wait on this for a
        recording's rows, since a recording found at the first look is in the first refresh."""
        return self.watcher.rows

    def result(self) -> Result:
        """The outputs as they are now, one complete set, while the watch goes on appending."""
        return result(self.watcher.inputs.out)

    def stop(self, timeout: float | None = 300) -> None:
        """Stop after the current step; everything the watch started ends. Raises what stopped it, if anything did."""
        self.watcher.stop()
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@own_errors
def watch(
    inbox: PathLike,
    spec: PathLike,
    checkpoint: PathLike | None = None,
    *,
    csv: PathLike | None = None,
    out: PathLike | None = None,
    label: str | None = None,
    label_from_folder: bool = False,
    valid: bool = False,
    pad: bool = False,
    rows_per_file: int | None = None,
    valid_list: PathLike | None = None,
    broker: str | None = None,
    workers: int | None = None,
    pca_params: PathLike | None = None,
    parquet: bool = False,
    settle: float = 1.0,
    poll: float = 0.5,
    compact_after: int = COMPACT_AFTER,
) -> Watch:
    """Start `producer watch` on INBOX in the background and return at once; `.stop()` ends it."""
    from producer.clips import ClipOptions
    from producer.watcher import WatchLoop

    inputs = JobInputs.of(spec, csv, out, checkpoint=checkpoint, settings=Settings.from_env().given(broker_url=broker))
    clips = ClipOptions(label, label_from_folder, valid, pad, rows_per_file, Path(valid_list) if valid_list else None)
    watcher = WatchLoop(
        inputs=inputs, inbox=Path(inbox), clips=clips, workers=workers,
        pca_params=store.location(pca_params) if pca_params else None, parquet=parquet, settle=settle, poll=poll,
        compact_after=compact_after,
    )
    return Watch(watcher)
