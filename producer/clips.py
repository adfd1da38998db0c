"""Adding recorded clips to the user's .dat/CSV pair, so that the two never get out of step.

An append converts every file first (into a temp .dat beside the spectrograms), so one bad file
leaves the pair untouched. Then it writes a journal holding both files' old sizes, appends to the
.dat and the CSV, fsyncs, and removes the journal. A journal found later means an append was cut
off: both files are truncated back to the sizes it holds. A lock on the .dat keeps two appends apart.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow.compute as pc

from producer.audio import file_examples, is_recording
from producer.dataset import csv_header, csv_reader, csv_rows, journal_path, validate
from vggish_pipeline.core.errors import InputError, PipelineError, UsageError
from vggish_pipeline.core.files import append_together, settle_append, write_json
from vggish_pipeline.core.spectrogram import DTYPE, ROW_BYTES

NEW_HEADER = ["", "file_name", "label", "valid"]  # "": the unnamed index column pandas writes and reads back with index_col=0
STAGED = ".staged"


@dataclass(frozen=True)
class Clip:
    path: Path  # the recording
    file_name: str  # what the CSV's file_name column gets
    label: str


@dataclass
class Added:
    clip: Clip
    rows: int = 0
    error: str | None = None  # why the file was refused
    duplicate: bool = False  # its file_name is already in the CSV


def roll_back(spec: Path, csv_path: Path) -> bool:
    """Undo an append that was cut off, and drop its staged rows; True if there was one. Needs `locked`."""
    leftovers = list(spec.parent.glob(f".{spec.name}.*{STAGED}"))
    for staged in leftovers:
        staged.unlink()
    journal = journal_path(spec)
    with contextlib.suppress(OSError, ValueError):  # a journal of an older release: both sizes by name
        old = json.loads(journal.read_text())
        if "spec_bytes" in old:
            write_json(journal, {"sizes": {str(spec): old["spec_bytes"], str(csv_path): old["csv_bytes"]}})
    return settle_append(journal) or bool(leftovers)


@contextlib.contextmanager
def locked(spec: Path, csv_path: Path) -> Iterator[None]:
    """Hold the pair for one writer; create an empty pair (with a ,file_name,label,valid header) if neither exists."""
    if spec.exists() != csv_path.exists():
        missing = csv_path if spec.exists() else spec
        raise InputError(f"{missing}: no such file (the .dat and the CSV are created together or not at all)")
    created = not spec.exists()
    if created:
        spec.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "x", newline="") as f:
            csv.writer(f).writerow(NEW_HEADER)
        spec.touch()
    try:
        with open(spec, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"{spec}: another add-clips or watch is appending to it") from None
            yield
    finally:
        if created and spec.stat().st_size == 0:  # nothing was added: leave no empty pair behind
            spec.unlink()
            csv_path.unlink()


def known_names(csv_path: Path) -> set[str]:
    """file_name values already in the CSV, so a clip is never added twice."""
    header = csv_header(csv_path)
    if "file_name" not in header:
        return set()
    column = f"_{header.index('file_name')}"
    names: set[str] = set()
    for batch in csv_reader(csv_path):
        names.update(pc.unique(batch.column(column)).to_pylist())
    return names


class CsvRows:
    """Builds CSV lines in the existing frame's column order: an unnamed index column counts on."""

    def __init__(self, csv_path: Path, start_row: int) -> None:
        self.header = csv_header(csv_path)
        if "file_name" not in self.header or "label" not in self.header:
            raise InputError(f"{csv_path}: needs file_name and label columns to take new clips")
        self.next_index = start_row
        self.valid_words = ("True", "False")
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            first = next(reader, None)
        if first and "valid" in self.header and first[self.header.index("valid")] in ("0", "1"):
            self.valid_words = ("1", "0")

    def lines(self, file_name: str, label: str, valid: bool, rows: int) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        values = {"file_name": file_name, "label": label, "valid": self.valid_words[0 if valid else 1]}
        for _ in range(rows):
            writer.writerow([str(self.next_index) if name == "" else values.get(name, "") for name in self.header])
            self.next_index += 1
        return out.getvalue()


def append_clips(
    spec: Path, csv_path: Path, clips: list[Clip], valid: bool, pad: bool, skip: set[str], partial: bool = False
) -> list[Added]:
    """Convert `clips` and append their rows to the pair; the caller holds `locked`.

    Clips whose file_name is in `skip` are left out, so re-running the same add is harmless. If a
    file is refused, nothing is appended, unless `partial` (then the other files still are).
    """
    roll_back(spec, csv_path)
    if spec.stat().st_size:
        rows_before = validate(spec, csv_path)
    elif csv_rows(csv_path):
        raise InputError(f"{spec} is empty but {csv_path} has rows; they must match one to one")
    else:
        rows_before = 0
    seen = set(skip)
    results = []
    for clip in clips:  # a name already in the CSV, or twice in this call, is added once
        results.append(Added(clip, duplicate=clip.file_name in seen))
        seen.add(clip.file_name)
    fd, staged = tempfile.mkstemp(dir=spec.parent, prefix=f".{spec.name}.", suffix=STAGED)
    try:
        builder = CsvRows(csv_path, rows_before)
        text = []
        with os.fdopen(fd, "wb") as out:
            for added in results:
                if added.duplicate:
                    continue
                try:
                    examples = file_examples(added.clip.path, pad)
                except PipelineError as e:
                    added.error = str(e)
                    continue
                np.ascontiguousarray(examples, dtype=DTYPE).tofile(out)
                added.rows = len(examples)
                text.append(builder.lines(added.clip.file_name, added.clip.label, valid, added.rows))
        if any(a.error for a in results) and not partial:
            return results
        if any(a.rows for a in results):
            commit(spec, csv_path, Path(staged), "".join(text).encode())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
    return results


def commit(spec: Path, csv_path: Path, staged: Path, csv_bytes: bytes) -> None:
    """Append the staged rows to the .dat and their lines to the CSV as one journaled step."""
    with open(csv_path, "rb") as f:
        f.seek(max(csv_path.stat().st_size - 1, 0))
        needs_newline = f.read(1) not in (b"\n", b"")
    append_together([(spec, staged), (csv_path, (b"\n" if needs_newline else b"") + csv_bytes)], journal_path(spec))


@dataclass(frozen=True)
class ClipOptions:
    """How recordings become rows: one label for all or each its folder's, the valid flag, padding."""

    label: str | None = None
    label_from_folder: bool = False
    valid: bool = False
    pad: bool = False  # zero-pad a clip shorter than one example to one row

    def check(self) -> None:
        if (self.label is None) == (not self.label_from_folder):
            raise UsageError("give exactly one of --label LABEL or --label-from-folder")


def gather(paths: list[Path], label: str | None, base: Path) -> list[Clip]:
    """Clips for the given files and folders (searched for recordings, see audio.is_recording),
    labelled `label` or, without one, by their folder; file_name is the path relative to `base`
    (the CSV's folder), or absolute outside it, so it does not depend on the folder a command runs in."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if is_recording(p) and p.is_file())
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file")
    here = Path(os.path.realpath(base))
    clips = []
    for path in files:
        absolute = path.resolve()
        name = absolute.relative_to(here).as_posix() if absolute.is_relative_to(here) else absolute.as_posix()
        clips.append(Clip(path, name, label if label is not None else absolute.parent.name))
    return clips


def add_files(spec: Path, csv_path: Path, paths: list[Path], options: ClipOptions, out: TextIO | None = None) -> dict:
    """`add-clips`: the recordings in `paths` (files or folders) as rows of SPEC and FRAME, all or
    nothing; one line per file to `out`. Returns the summary; InputError if any file is refused."""
    options.check()
    clips = gather(paths, options.label, csv_path.parent)
    if not clips:
        raise InputError("no recordings found in " + ", ".join(map(str, paths)))
    with locked(spec, csv_path):
        results = append_clips(spec, csv_path, clips, options.valid, options.pad, known_names(csv_path))
    refused = [r for r in results if r.error]
    added = [r for r in results if r.rows]
    for r in results:
        what = "already in the CSV, skipped" if r.duplicate else f"{r.rows} row{'s' * (r.rows != 1)}"
        if out is not None:
            out.write((r.error or f"{r.clip.path}: {what}") + "\n")
    if refused:
        reasons = "listed above" if out else "; ".join(r.error for r in refused[:3] if r.error)
        raise InputError(f"{len(refused)} of {len(results)} files refused ({reasons}); nothing was added")
    return {
        "spec": str(spec),
        "csv": str(csv_path),
        "files_added": len(added),
        "files_skipped": sum(r.duplicate for r in results),
        "rows_added": sum(r.rows for r in added),
        "rows": spec.stat().st_size // ROW_BYTES if spec.exists() else 0,
    }
