"""A watched inbox: recordings that land in it are added to the .dat and CSV, embedded (only the
new rows) and appended to the outputs, until stopped. The CLI's `producer watch` and the Python
API's `watch` both run a Watcher."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from producer.clips import Clip, append_clips, check_label_choice, known_names, locked
from producer.inbox import Inbox
from producer.run import JobInputs, check_workers, embed, local_capacity, remote_capacity
from vggish_pipeline.core.errors import InputError, PipelineError, WorkersDied


@dataclass
class Watcher:
    inputs: JobInputs
    inbox: Path
    label: str | None = None
    label_from_folder: bool = False
    valid: bool = False
    pad: bool = False
    broker: str | None = None
    workers: int | None = None
    pca_params: Path | None = None
    parquet: bool = False
    settle: float = 1.0
    poll: float = 0.5
    out: TextIO = sys.stderr
    stopping: threading.Event = field(default_factory=threading.Event)
    refreshes: int = 0  # how many times the outputs were brought up to date

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def stop(self) -> None:
        """Ask a running watch to stop after the step it is in (from another thread, e.g. a notebook cell)."""
        self.stopping.set()

    def run(self, once: bool = False) -> None:
        """Watch until stopped (or, with `once`, handle what is in the inbox now and return).
        Everything it starts ends with it; an append it is in the middle of is rolled back next time."""
        from producer.audio import warm_up
        from producer.finalize import refresh
        from producer.local import first_ready, local_workers
        from vggish_pipeline.core import broker
        from vggish_pipeline.core.postprocess import PCA

        check_label_choice(self.label, self.label_from_folder)
        if not self.inbox.is_dir():
            raise InputError(f"{self.inbox}: no such folder")
        check_workers(self.workers)
        spec, frame = self.inputs.spec, self.inputs.csv
        app = broker.optional_app(self.broker, self.inputs.settings)
        if app is None:
            self.inputs.required_checkpoint()  # before anything starts
        model = self.inputs.model()
        pca = PCA(self.pca_params) if self.pca_params else None
        inbox = Inbox(self.inbox, settle=self.settle)
        with contextlib.ExitStack() as stack:
            stack.enter_context(locked(spec, frame))
            if app is None:
                logs = self.inputs.out / "logs"
                ckpt = self.inputs.required_checkpoint()
                app, fleet = stack.enter_context(local_workers(ckpt, self.workers, self.inputs.data_roots(), logs, self.inputs.settings))
                first_ready(app, fleet)  # the checkpoint is good before any job is pinned to it
                self.say(f"workers: {fleet.summary()}")
                workers = local_capacity(fleet)
            else:
                fleet = None
                broker.check_connection(app)
                workers = remote_capacity(app)
            warm_up()  # resampy and numba now, not on the first clip
            names = known_names(frame)
            self.say(f"watching {self.inbox} for recordings ({len(names)} clips already in {frame})")
            embedded_rows, first = 0, True
            while not self.stopping.is_set():
                added = self.ingest(inbox, names)
                if (added or first) and spec.stat().st_size:
                    began = time.monotonic()
                    planned = self.inputs.plan(workers, model, unchanged_rows=embedded_rows)
                    try:
                        embed(app, planned.job, planned.send, fleet, progress=False)
                        refresh(planned.job, pca, self.parquet)
                    except WorkersDied:
                        raise
                    except PipelineError as e:
                        self.say(f"producer: error: {e} (still watching)")
                    else:
                        embedded_rows = planned.job.rows
                        self.refreshes += 1
                        summary = planned.summary()
                        self.say(
                            f"outputs refreshed: {planned.job.rows} rows ({summary.enqueued_rows} embedded, "
                            f"{summary.reused_rows} reused) in {time.monotonic() - began:.1f} s"
                        )
                first = False
                if once:
                    return
                self.stopping.wait(self.poll)
                if fleet:
                    fleet.revive()  # a service replaces a dead worker even while nothing lands

    def ingest(self, inbox: Inbox, names: set[str]) -> int:
        """Add the recordings that are ready; each moves to added/ or, with its reason, failed/. Rows added."""
        clips = []
        for path in inbox.ready():
            label = self.label or inbox.label_folder(path)
            if label is None:
                inbox.move(path, "no label: put the file in a LABEL/ folder, or start watch with --label")
                self.say(f"{path}: refused, no label folder")
            else:
                clips.append(Clip(path, inbox.file_name(path), label))
        if not clips:
            return 0
        frame = self.inputs.csv
        results = append_clips(self.inputs.spec, frame, clips, self.valid, self.pad, names, partial=True)
        for r in results:
            if r.duplicate:
                r.error = f"a clip named {r.clip.file_name} is already in {frame}; rename the file to add it"
            moved = inbox.move(r.clip.path, r.error)
            names.add(r.clip.file_name)
            self.say(f"{r.clip.file_name}: {r.error or f'{r.rows} rows added'} -> {moved}")
        return sum(r.rows for r in results)
