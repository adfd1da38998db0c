"""A folder that recordings land in: which recordings are complete, and where each goes once handled.

A file is ready when its size and mtime have not changed for `settle` seconds and, if its RIFF
header states a length, the file has reached it; a header that never completes counts as ready
after `stall` seconds so that its error gets reported. A file whose mtime is already `settle`
seconds old when it is first seen has settled: a `watch --once` from cron takes the finished
recordings it finds, and leaves (and names) those still being written. Handled files move to `added/` or
`failed/` (with `<name>.error.txt`) under the inbox, keeping their relative path.

A symlink is read only if its target lies inside the inbox; one that points out of it (or at
nothing) goes to failed/ with that reason, and its target is never opened. Folders reached
through a symlink are not entered.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from producer.audio import is_recording

UNKNOWN_RIFF_SIZES = (0, 0xFFFFFFFF)  # written by recorders that stream, before they patch the header


def riff_complete(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"RIFF":
        return True  # not a RIFF file: its own length is unknown, settling decides
    stated = struct.unpack_from("<I", head, 4)[0]
    return stated in UNKNOWN_RIFF_SIZES or size >= stated + 8


class Inbox:
    def __init__(self, root: Path, settle: float = 1.0, stall: float = 30.0) -> None:
        self.root = root
        self.added = root / "added"
        self.failed = root / "failed"
        self.settle = settle
        self.stall = stall
        self._seen: dict[Path, tuple[tuple[int, int], float]] = {}
        self.pending: dict[Path, float] = {}  # after ready(): recordings not ready yet, and how long they have been quiet

    def recordings(self) -> list[Path]:
        found = []
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and here / d not in (self.added, self.failed))
            found += [here / f for f in sorted(files) if is_recording(here / f)]
        return found

    def ready(self) -> list[Path]:
        """Recordings that are done being written, oldest first seen first."""
        now, wall = time.monotonic(), time.time()
        seen, ready, pending = {}, [], {}
        for path in self.recordings():
            if self.refusal(path):
                ready.append(path)  # refused at once, its target never opened
                continue
            try:
                st = path.stat()
                key = (st.st_size, st.st_mtime_ns)
                prev = self._seen.get(path)
                since = prev[1] if prev and prev[0] == key else now
                seen[path] = (key, since)
                quiet = max(now - since, wall - st.st_mtime)  # unchanged since seen, or since last written
                if quiet >= self.stall or (quiet >= self.settle and riff_complete(path, st.st_size)):
                    ready.append(path)
                else:
                    pending[path] = max(quiet, 0.0)
            except FileNotFoundError:
                continue  # renamed or removed under us
        self._seen, self.pending = seen, pending
        return ready

    def refusal(self, path: Path) -> str | None:
        """Why a ready recording must not be read: a symlink out of the inbox, or to nothing."""
        if not path.is_symlink():
            return None
        target = Path(os.path.realpath(path))
        if not target.exists():
            return f"{self.file_name(path)}: a symlink to nothing ({os.readlink(path)})"
        if not target.is_relative_to(os.path.realpath(self.root)):
            return f"{self.file_name(path)}: a symlink to {target}, outside the inbox; copy or move the recording in instead"
        return None

    def file_name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def label_folder(self, path: Path) -> str | None:
        """The folder a file sits in (speech-commands layout INBOX/LABEL/clip.wav), None at the top."""
        return path.parent.name if path.parent != self.root else None

    def move(self, path: Path, error: str | None = None) -> Path:
        """Move a handled file to added/ or, with its error beside it, to failed/."""
        target = (self.failed if error else self.added) / path.relative_to(self.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while os.path.lexists(target):  # a second recording under the same name: never overwrite the first
            n += 1
            target = target.with_name(f"{path.stem}.{n}{path.suffix}")
        os.replace(path, target)
        if error:
            target.with_name(target.name + ".error.txt").write_text(error + "\n")
        self._seen.pop(path, None)
        return target
