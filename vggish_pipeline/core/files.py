"""Writing files so that a reader sees the old file or the whole new one, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NoReturn

from vggish_pipeline.core.errors import WriteError

# Errors that can only come from writing: turned into one line naming the file.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


SET_JOURNAL = ".publish-journal.json"
APPEND_JOURNAL = ".append-journal.json"


def temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file in `path`'s folder, with the mode an output usually gets (mkstemp makes 0600)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def failed_write(e: BaseException, path: Path, temps: list[str]) -> NoReturn:
    """Remove what was half written, and raise again: a full disk, a read-only folder… as one WriteError."""
    for tmp in temps:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        raise WriteError(f"cannot write {path}: {e.strerror}") from e
    raise e


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", exclusive: bool = False) -> Iterator[IO]:
    """Yield a temp file beside `path`; on success fsync it and rename it over `path`, else remove
    it. A full disk, a read-only or vanished folder or a refused permission raise WriteError.
    `exclusive`: never replace a `path` that exists (FileExistsError), not even one that appears
    while the temp file is written; a file system without hard links falls back to a rename."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        elif path.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        else:
            try:
                os.link(tmp, path)  # fails if `path` exists by now: the first one stays
                os.unlink(tmp)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                os.replace(tmp, path)
    except BaseException as e:
        failed_write(e, path, [tmp])


@contextlib.contextmanager
def atomic_set(paths: list[Path]) -> Iterator[list[IO]]:
    """Write several files of one folder as one set: a reader after a crash finds the old set or
    the new one, never files of both.

    Each file goes to a temp file, fsynced; then a journal names the renames, they run, the folder
    is fsynced and the journal removed. A crash before the journal leaves the old set; after it,
    `finish_set` (run by the next command on the folder) completes the new one.
    """
    folder = paths[0].parent
    finish_set(folder)
    temps: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            files: list[IO] = []
            for path in paths:
                fd, tmp = temp_beside(path)
                temps.append(tmp)
                files.append(stack.enter_context(os.fdopen(fd, "wb")))
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        write_json(folder / SET_JOURNAL, [[tmp, str(path)] for tmp, path in zip(temps, paths, strict=True)])
        fsync_folder(folder)
    except BaseException as e:
        failed_write(e, folder, temps)
    finish_set(folder)


def finish_set(folder: Path) -> None:
    """Complete a set whose publication a crash cut short (see atomic_set); nothing if none was."""
    journal = folder / SET_JOURNAL
    try:
        renames = json.loads(journal.read_text())
    except FileNotFoundError:
        return
    for tmp, final in renames:
        if os.path.exists(tmp):
            os.replace(tmp, final)
    fsync_folder(folder)
    journal.unlink()
    fsync_folder(folder)


class Appender:
    """One file of an `appending` step: a failed write is one WriteError naming the file."""

    def __init__(self, path: Path, f: IO) -> None:
        self.path, self.file = path, f

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            failed_write(e, self.path, [])

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            failed_write(e, self.path, [])


@contextlib.contextmanager
def appending(paths: list[Path], journal: Path, commit: tuple[Path, bytes] | None = None) -> Iterator[list[Appender]]:
    """Append to several files of one folder as one step: yields them open for appending.

    `journal` first notes each file's size (and the digest of `commit`'s record, when there is
    one). With a commit, the step is done once that record (what the files hold) replaces the
    commit file; without, once the journal is gone. A crash before that leaves the files cut back
    to their old sizes by `settle_append` (run by the next command on the files, and here at
    once on an exception). The one protocol for `add-clips` (the .dat and the CSV) and for
    outputs that grow in place.
    """
    settle_append(journal)
    folder = journal.parent
    step: dict = {"sizes": {os.path.realpath(path): path.stat().st_size for path in paths}}
    if commit is not None:
        step.update(commit=str(commit[0]), digest=hashlib.sha256(commit[1]).hexdigest())
    write_json(journal, step)
    fsync_folder(folder)
    failing = journal  # the file being written, for the error line
    try:
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(path, "ab")) for path in paths]
            yield [Appender(path, f) for path, f in zip(paths, files, strict=True)]
            for path, f in zip(paths, files, strict=True):
                failing = path
                f.flush()
                os.fsync(f.fileno())
        if commit is not None:
            failing = commit[0]
            with atomic_write(commit[0]) as record:
                record.write(commit[1])
            fsync_folder(folder)
        journal.unlink()
        fsync_folder(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            settle_append(journal)
        failed_write(e, failing, [])


def append_together(appends: list[tuple[Path, bytes]], journal: Path, commit: tuple[Path, bytes] | None = None) -> None:
    """`appending` these bytes, each file's in one write: readers see whole rows arrive."""
    with appending([path for path, _ in appends], journal, commit) as files:
        for f, (_, data) in zip(files, appends, strict=True):
            f.write(data)


def settle_append(journal: Path) -> bool:
    """Settle an append_together a crash cut short: done if its commit record is in place, else
    every file cut back to its size before. True if there was one to settle."""
    try:
        step = json.loads(journal.read_text())
    except FileNotFoundError:
        return False
    commit = step.get("commit")
    done = commit is not None and os.path.exists(commit) and hashlib.sha256(Path(commit).read_bytes()).hexdigest() == step["digest"]
    if not done:
        for path, size in step["sizes"].items():
            with contextlib.suppress(FileNotFoundError), open(path, "r+b") as f:
                if os.fstat(f.fileno()).st_size > size:
                    f.truncate(size)
                    os.fsync(f.fileno())
    journal.unlink()
    fsync_folder(journal.parent)
    return True


def fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (a rename is a change to the folder, not to the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def create_bytes(path: Path, data: bytes) -> bool:
    """Write `data` to `path` (durably) only if no file is there yet; True if this call created it."""
    try:
        with atomic_write(path, exclusive=True) as f:
            f.write(data)
    except FileExistsError:
        return False
    return True
