"""Recordings to examples on every core this process may use, handed back in file order.

Files go out in batches (a few dozen, or a few MB of audio) to worker processes; at most two
batches per process are out at once, so memory stays bounded whatever the corpus size, and each
batch comes back whole, in order, so the rows written are byte-identical to a one-process run.
The processes are forked when the pool opens, before its user locks or opens any file to write,
and they leave when the pool closes or within a second of their parent's death (kill -9).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from producer.audio import file_examples
from vggish_pipeline.core.errors import PipelineError
from vggish_pipeline.core.spectrogram import DTYPE

BATCH_FILES = 32
BATCH_BYTES = 8 << 20  # of audio files: long recordings go a few at a time
AHEAD = 2  # batches out per process


@dataclass(frozen=True)
class Converted:
    """One recording's rows, or why it gave none."""

    examples: np.ndarray | None = None
    error: str | None = None


def convert(paths: list[Path], pad: bool, rows: int | None) -> list[Converted]:
    out = []
    for path in paths:
        try:
            out.append(Converted(np.ascontiguousarray(file_examples(path, pad, rows), dtype=DTYPE)))
        except PipelineError as e:
            out.append(Converted(error=str(e)))
        except MemoryError:  # one huge recording: refused like any file that cannot be read, not the whole add
            out.append(Converted(error=f"{path}: too large to convert in this process's memory"))
    return out


def batches(paths: list[Path]) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for path in paths:
        batch.append(path)
        try:
            size += path.stat().st_size
        except OSError:
            pass  # its conversion says why
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def child_setup(parent: int) -> None:
    """In each worker process: one BLAS thread (the log-mel's small matrix product gains nothing from
    more, and a pool of processes each spinning up a thread per core ran 2x slower than one process
    here), Ctrl-C is the parent's to handle, and the parent's death ends it."""
    threadpool_limits(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class Pool:
    """`with Pool(jobs) as pool: for c in pool.convert(paths, pad, rows)`: one Converted per path, in order.

    One job (or one file) converts in this process; more fork that many processes at once.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs)
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> Pool:
        if self.jobs > 1:
            context = multiprocessing.get_context("fork")  # not spawn: a user's script without a __main__ guard would run again
            self.executor = ProcessPoolExecutor(self.jobs, mp_context=context, initializer=child_setup, initargs=(os.getpid(),))
            self.executor.submit(int).result()  # a fork pool starts all its processes on its first task: now
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def convert(self, paths: list[Path], pad: bool, rows: int | None) -> Iterator[Converted]:
        if self.executor is None:
            with threadpool_limits(1):  # as in the pool's processes (see child_setup): the same speed, the same bytes
                for batch in batches(paths):
                    yield from convert(batch, pad, rows)
            return
        pending: deque[Future] = deque()
        try:
            for batch in batches(paths):
                pending.append(self.executor.submit(convert, batch, pad, rows))
                if len(pending) >= AHEAD * self.jobs:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise PipelineError("a process converting recordings was killed (out of memory?); nothing was added") from None
