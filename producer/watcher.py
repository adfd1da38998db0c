"""A watched inbox: recordings that land in it are added to the .dat and CSV, embedded (only the
new rows) and appended to the outputs, until stopped. The CLI's `producer watch` and the Python
API's `watch` both run a WatchLoop."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from producer.clips import Clip, ClipOptions, append_clips, known_names, locked
from producer.compact import COMPACT_AFTER, compact, small_chunks
from producer.dataset import Known
from producer.inbox import Inbox
from producer.run import Crew, JobInputs, check_workers
from vggish_pipeline.core import store
from vggish_pipeline.core.errors import InputError, PipelineError, UsageError, WorkersDied

if TYPE_CHECKING:
    from vggish_pipeline.core.postprocess import PCA


@dataclass(kw_only=True)
class WatchLoop:
    """The loop of a watch: one inbox, one job; `run` it (the API's `Watch` runs one in a thread)."""

    inputs: JobInputs  # its settings name the broker whose workers embed (none: start local ones)
    inbox: Path
    clips: ClipOptions = ClipOptions()
    workers: int | None = None  # at most this many local workers
    pca_params: store.Location | None = None
    parquet: bool = False
    settle: float = 1.0
    poll: float = 0.5
    compact_after: int = COMPACT_AFTER  # small chunks (one per refresh) merged once there are this many; 0: never
    out: TextIO = field(default_factory=lambda: sys.stderr)  # where its lines go: stderr as the call finds it
    stopping: threading.Event = field(default_factory=threading.Event)
    known: Known = field(default_factory=Known)  # the pair as this watch (its one writer) left it: not read again each refresh
    refreshes: int = 0  # how many times the outputs were brought up to date
    rows: int = 0  # the rows the outputs hold after the last refresh

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def pair(self) -> tuple[Path, Path]:
        """The .dat and CSV the watch appends to: local files (an object cannot grow); its job folder may be on a store."""
        return store.local(self.inputs.spec, "watch (it appends)"), store.local(self.inputs.csv, "watch (it appends)")

    def stop(self) -> None:
        """Ask a running watch to stop after the step it is in (from another thread, e.g. a notebook cell)."""
        self.stopping.set()

    def run(self, once: bool = False) -> None:
        """Watch until stopped (or, with `once`, handle what is in the inbox now and return).
        Everything it starts ends with it; an append it is in the middle of is rolled back next time."""
        from producer.audio import warm_up
        from producer.run import crew
        from vggish_pipeline.core import broker
        from vggish_pipeline.core.postprocess import PCA

        self.clips.check()
        if self.compact_after < 0:
            raise UsageError(f"--compact-after must be 0 (never) or more, not {self.compact_after}")
        if not self.inbox.is_dir():
            raise InputError(f"{self.inbox}: no such folder")
        check_workers(self.workers)
        app = broker.optional_app(self.inputs.settings)
        model = self.inputs.model()
        pca = PCA(self.pca_params) if self.pca_params else None
        spec, csv_path = self.pair()
        with locked(spec, csv_path), crew(self.inputs, app, self.workers, say=self.say) as team:
            team.ready()  # the checkpoint is good before any job is pinned to it
            if team.fleet is not None:
                self.say(f"workers: {team.fleet.summary()}")
            warm_up()  # resampy and numba now, not on the first clip
            names = known_names(csv_path)
            self.say(f"watching {self.inbox} for recordings ({len(names)} clips already in {csv_path})")
            self.follow(team, model, pca, names, once)

    def follow(self, team: Crew, model: str | None, pca: PCA | None, names: set[str], once: bool) -> None:
        """Take what lands, and bring the outputs up to date after each arrival (and at the first look)."""
        inbox = Inbox(self.inbox, settle=self.settle)
        embedded_rows, first = 0, True
        while not self.stopping.is_set():
            added = self.ingest(inbox, names)
            if (added or first) and self.inputs.spec.stat().st_size:
                embedded_rows = self.refresh(team, model, pca, embedded_rows)
            first = False
            if once:
                for path, quiet in inbox.pending.items():
                    self.say(f"{inbox.file_name(path)}: still being written (unchanged for {quiet:.1f} s of the "
                             f"{self.settle:g} s --settle asks); left for the next look")
                return
            self.stopping.wait(self.poll)
            team.tend()  # a service replaces a dead worker even while nothing lands (or lets idle ones go)

    def refresh(self, team: Crew, model: str | None, pca: PCA | None, embedded_rows: int) -> int:
        """Embed the rows past `embedded_rows` and append them to the outputs; the rows embedded after.
        A failure other than dying workers is a line, and the watch goes on."""
        from producer.finalize import refresh

        began = time.monotonic()
        planned = self.inputs.plan(team.capacity, model, unchanged_rows=embedded_rows, known=self.known)
        try:
            team.enqueue_and_wait(planned.job, planned.to_embed, progress=False)
            refresh(planned.job, pca, self.parquet, self.known)
        except WorkersDied:
            raise
        except PipelineError as e:
            self.say(f"producer: error: {e} (still watching)")
            return embedded_rows
        self.refreshes += 1
        self.rows = planned.job.rows
        summary = planned.summary()
        self.say(
            f"outputs refreshed: {planned.job.rows} rows ({summary.enqueued_rows} embedded, "
            f"{summary.reused_rows} reused) in {time.monotonic() - began:.1f} s"
        )
        on_store = store.remote(planned.job.dir.path)  # compaction rewrites a local manifest in place: not on a store
        if self.compact_after and not on_store and small_chunks(planned.job) >= self.compact_after:
            try:
                done = compact(planned.job)
            except PipelineError as e:
                self.say(f"producer: error: compacting: {e} (still watching)")
            else:
                if done.merged_rows:
                    merged = f"{done.chunks_before} chunks to {done.chunks_after}, {done.merged_rows} rows re-cut"
                    self.say(f"compacted: {merged}, none embedded again")
        return planned.job.rows

    def ingest(self, inbox: Inbox, names: set[str]) -> int:
        """Add the recordings that are ready; each moves to added/ or, with its reason, failed/. Rows added."""
        clips = []
        ready = inbox.ready()
        for path, valid in zip(ready, self.clips.valid_flags(ready), strict=True):
            label = self.clips.label or inbox.label_folder(path)
            refusal = inbox.refusal(path)
            if refusal is not None:
                self.say(f"{refusal} -> {inbox.move(path, refusal)}")
            elif label is None:
                inbox.move(path, "no label: put the file in a LABEL/ folder, or start watch with --label")
                self.say(f"{path}: refused, no label folder")
            else:
                clips.append(Clip(path, inbox.file_name(path), label, valid))
        if not clips:
            return 0
        spec, csv_path = self.pair()
        results = append_clips(spec, csv_path, clips, self.clips, names, partial=True, known=self.known)
        for r in results:
            if r.duplicate:
                r.error = f"a clip named {r.clip.file_name} is already in {csv_path}; rename the file to add it"
            moved = inbox.move(r.clip.path, r.error)
            names.add(r.clip.file_name)
            self.say(f"{r.clip.file_name}: {r.error or f'{r.rows} rows added'} -> {moved}")
        return sum(r.rows for r in results)
