"""Adding recorded clips to the user's .dat/CSV pair, so that the two never get out of step.

An append first writes a journal holding both files' old sizes. Then the recordings are converted
(on every usable core, see pool.py) and their rows appended to the .dat in file order as they
come; then their lines to the CSV; both are fsynced and the journal removed. A refused file cuts
both back to their old sizes, so one bad file leaves the pair untouched, unless in corpus mode
(`--bad-files`) it is listed in a report while the rest go in. A journal found later means an
append was cut off (a crash, kill -9): both files are truncated back to the sizes it holds. A
lock on the .dat keeps two appends apart.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import os
import posixpath
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow.compute as pc

from producer.audio import is_recording
from producer.dataset import Known, csv_header, csv_reader, csv_rows, journal_path, validate
from producer.pool import Pool
from producer.progress import Display, counted
from vggish_pipeline.core.devices import usable_cores
from vggish_pipeline.core.errors import InputError, UsageError
from vggish_pipeline.core.files import appending, atomic_write, settle_append, write_json
from vggish_pipeline.core.spectrogram import ROW_BYTES

NEW_HEADER = ["", "file_name", "label", "valid"]  # "": the unnamed index column pandas writes and reads back with index_col=0
STAGED = ".staged"


@dataclass(frozen=True)
class Clip:
    path: Path  # the recording
    file_name: str  # what the CSV's file_name column gets
    label: str
    valid: bool = False


@dataclass
class Added:
    clip: Clip
    rows: int = 0
    error: str | None = None  # why the file was refused
    duplicate: bool = False  # its file_name is already in the CSV


def roll_back(spec: Path, csv_path: Path) -> bool:
    """Undo an append that was cut off (and drop the staged rows of an older release's); True if
    there was one. Needs `locked`."""
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
    spec: Path,
    csv_path: Path,
    clips: list[Clip],
    options: ClipOptions,
    skip: set[str],
    partial: bool = False,
    pool: Pool | None = None,
    done: Callable[[Added], None] | None = None,
    known: Known | None = None,
) -> list[Added]:
    """Convert `clips` (in `pool`, or here) and append their rows to the pair; the caller holds `locked`.

    Clips whose file_name is in `skip` are left out, so re-running the same add is harmless. If a
    file is refused, nothing is appended, unless `partial` (then the other files still are).
    `done` is told of each file as its rows are written, in order. `known`: the pair's rows as its
    one writer (a watch) knows them, kept up to date here (see dataset.Known).
    """
    roll_back(spec, csv_path)
    if spec.stat().st_size:
        rows_before = validate(spec, csv_path, known)
    elif csv_rows(csv_path):
        raise InputError(f"{spec} is empty but {csv_path} has rows; they must match one to one")
    else:
        rows_before = 0
    seen = set(skip)
    results = []
    for clip in clips:  # a name already in the CSV, or twice in this call, is added once
        results.append(Added(clip, duplicate=clip.file_name in seen, error=unfit_name(clip)))
        seen.add(clip.file_name)
    todo = [a for a in results if not a.duplicate and not a.error]
    if done is not None:
        for added in results:
            if added.duplicate or added.error:
                done(added)
    builder = CsvRows(csv_path, rows_before)
    lines = []
    refused = any(a.error for a in results)
    try:
        with appending([spec, csv_path], journal_path(spec)) as (rows, frame), contextlib.ExitStack() as stack:
            pool = pool or stack.enter_context(Pool(1))
            converted = pool.convert([a.clip.path for a in todo], options.pad, options.rows_per_file)
            for added, result in zip(todo, converted, strict=True):
                added.error = result.error
                refused = refused or result.error is not None
                if result.examples is not None:
                    added.rows = len(result.examples)
                    if partial or not refused:
                        rows.write(result.examples.data)
                        lines.append(builder.lines(added.clip.file_name, added.clip.label, added.clip.valid, added.rows))
                if done is not None:
                    done(added)
            if refused and not partial:
                raise NothingAdded
            if lines:
                frame.write((("\n" if needs_newline(csv_path) else "") + "".join(lines)).encode())
        if known is not None:
            known.rows = builder.next_index
            known.wrote(csv_path)
    except NothingAdded:  # `appending` has cut both files back
        for added in results:
            added.rows = 0
    return results


class NothingAdded(Exception):
    """A file was refused in an all-or-nothing add: the rows written so far are cut off again."""


def unfit_name(clip: Clip) -> str | None:
    """Why a file name cannot be a file_name value every CSV reader reads alike: a line break or
    another control character (Arrow's reader, like many, takes a line per row), or bytes that are
    not UTF-8. Commas and quotes are fine: the CSV quotes them."""
    name = clip.file_name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{str(clip.path)!r}: its name is not UTF-8; rename it to add it"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return f"{str(clip.path)!r}: its name has a line break or another control character; rename it to add it"
    return None


def needs_newline(csv_path: Path) -> bool:
    with open(csv_path, "rb") as f:
        f.seek(max(csv_path.stat().st_size - 1, 0))
        return f.read(1) not in (b"\n", b"")


@dataclass(frozen=True)
class ClipOptions:
    """How recordings become rows: one label for all or each its folder's, the valid flag (or a
    list of the valid files), padding, and how many rows a file gives."""

    label: str | None = None
    label_from_folder: bool = False
    valid: bool = False
    pad: bool = False  # zero-pad a clip shorter than one example to one row
    rows_per_file: int | None = None  # the first N examples of each file, short ones padded (default: all)
    valid_list: Path | None = None  # Speech Commands' validation_list.txt: the files it names are valid

    def check(self) -> None:
        if (self.label is None) == (not self.label_from_folder):
            raise UsageError("give exactly one of --label LABEL or --label-from-folder")
        if self.valid and self.valid_list is not None:
            raise UsageError("give --valid (every new row) or --valid-list FILE (the files it names), not both")
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise UsageError(f"--rows-per-file must be 1 or more, not {self.rows_per_file}")
        _ = self.listed  # a list that cannot be read is refused before any work

    @functools.cached_property
    def listed(self) -> set[str]:
        """The paths --valid-list names, read once (a watch does not read it again each look)."""
        if self.valid_list is None:
            return set()
        try:
            text = self.valid_list.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{self.valid_list}: cannot read the list ({getattr(e, 'strerror', None) or e})") from e
        return {posixpath.normpath(line.strip()) for line in text.splitlines() if line.strip()}

    def valid_flags(self, paths: list[Path]) -> list[bool]:
        """Each file's `valid`: --valid's, or whether the list names it by its path from the list's folder
        (the corpus root, where Speech Commands keeps validation_list.txt)."""
        if self.valid_list is None:
            return [self.valid] * len(paths)
        root = os.path.abspath(self.valid_list.parent)
        return [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() in self.listed for p in paths]


def gather(paths: list[Path], options: ClipOptions, base: Path) -> list[Clip]:
    """Clips for the given files and folders (searched for recordings, see audio.is_recording),
    labelled --label or by their folder (as the path names it: a symlink's, not its target's);
    file_name is the real path relative to `base` (the CSV's folder), or absolute outside it, so it
    does not depend on the folder a command runs in."""
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
    for path, valid in zip(files, options.valid_flags(files), strict=True):
        real = path.resolve()  # as earlier releases named files: a re-run adds nothing twice
        name = real.relative_to(here).as_posix() if real.is_relative_to(here) else real.as_posix()
        label = options.label if options.label is not None else Path(os.path.abspath(path)).parent.name
        clips.append(Clip(path, name, label, valid))
    return clips


LINES_UP_TO = 100  # files an add names one by one; above, progress instead (refused and skipped files always)


def add_files(
    spec: Path,
    csv_path: Path,
    paths: list[Path],
    options: ClipOptions,
    out: TextIO | None = None,
    *,
    bad_files: Path | None = None,
    jobs: int | None = None,
) -> dict:
    """`add-clips`: the recordings in `paths` (files or folders) as rows of SPEC and FRAME, converted
    on `jobs` processes (default: every usable core); progress and a line per file to `out`.

    All or nothing (InputError if any file is refused), unless `bad_files`: then the refused files
    are listed there (file, reason) and the rest are added; the summary's files_refused counts them.
    """
    options.check()
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be 1 or more, not {jobs}")
    if bad_files is not None:
        check_report(bad_files)
    clips = gather(paths, options, csv_path.parent)
    if not clips:
        raise InputError("no recordings found in " + ", ".join(map(str, paths)))
    began = time.monotonic()
    finished = 0

    def done(added: Added) -> None:
        nonlocal finished
        finished += 1
        if added.error or added.duplicate or (out is not None and len(clips) <= LINES_UP_TO):
            what = "already in the CSV, skipped" if added.duplicate else f"{added.rows} row{'s' * (added.rows != 1)}"
            display.write(added.error or f"{added.clip.path}: {what}")
        rate = finished / max(time.monotonic() - began, 1e-9)
        display.update(finished, "", counted(finished, len(clips), "files", rate), final=finished == len(clips))

    with Pool(min(jobs or usable_cores(), len(clips))) as pool:  # forked first: before a lock, a bar's thread
        display = Display(out or io.StringIO(), out is not None and len(clips) > LINES_UP_TO, len(clips), unit="files")
        try:
            with locked(spec, csv_path):
                results = append_clips(spec, csv_path, clips, options, known_names(csv_path), bad_files is not None, pool, done)
                if bad_files is not None:
                    write_report(bad_files, [r for r in results if r.error])
        finally:
            display.close()
    refused = [r for r in results if r.error]
    if refused and bad_files is None:
        reasons = "listed above" if out else "; ".join(r.error for r in refused[:3] if r.error)
        raise InputError(
            f"{len(refused)} of {len(results)} files refused ({reasons}); nothing was added "
            "(--bad-files REPORT adds the rest and lists these)"
        )
    added = [r for r in results if r.rows]
    return {
        "spec": str(spec),
        "csv": str(csv_path),
        "files_added": len(added),
        "files_skipped": sum(r.duplicate for r in results),
        "files_refused": len(refused),
        "rows_added": sum(r.rows for r in added),
        "rows": spec.stat().st_size // ROW_BYTES if spec.exists() else 0,
        **({"bad_files": str(bad_files)} if bad_files is not None else {}),
    }


def check_report(path: Path) -> None:
    """A report that could not be written is refused before any row is added."""
    if path.is_dir():
        raise UsageError(f"--bad-files {path}: is a folder; give a file name for the report")
    if not path.parent.is_dir():
        raise InputError(f"{path}: no folder {path.parent} to write the report in")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{path}: cannot write the report there (permission denied)")


def write_report(path: Path, refused: list[Added]) -> None:
    """The refused files, as CSV: file (its path as given) and reason."""
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "reason"])
        for r in refused:
            reason = r.error or ""
            prefix = f"{r.clip.path}: "
            writer.writerow([str(r.clip.path), reason[len(prefix) :] if reason.startswith(prefix) else reason])
