"""The finalizer: merge a job's shards, in row order, into the seed notebook's output files.

It streams: a few CSV blocks and the shards under them are in memory at a time, whatever N is.
The outputs are published as one set (worker.files.atomic_set): a crash leaves the old set or the
new one, never a torn file or files of both; re-running finalize is always safe.
"""

from __future__ import annotations

import csv
import io
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from producer.dataset import csv_header, csv_reader
from producer.job import Job
from producer.postprocess import PCA
from worker.devices import usable_cores
from worker.errors import InputError, JobFailed
from worker.files import atomic_set
from worker.shard import EMBEDDING_SIZE, read_shard

OUTPUT_DAT = "wavfile_embed.dat"
OUTPUT_CSV = "wavfile_embed.csv"
OUTPUT_PCA = "wavfile_embed_pca.dat"
EMBEDDING_COLUMNS = [f"e{i}" for i in range(EMBEDDING_SIZE)]
BLOCK_BYTES = 1 << 16  # of input CSV per block: ~1,900 rows, ~2.5 MB of output text


def ranges(pairs: list[tuple[int, int]], limit: int = 6) -> str:
    shown = ", ".join(f"{a}-{b}" for a, b in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def check_complete(job: Job) -> None:
    """Refuse, naming row ranges, unless every chunk has exactly the shard the plan asks for."""
    failures = job.failures()
    if failures:
        reasons = "; ".join(f"{f['start']}-{f['stop']}: {f['reason']}" for f in failures[:3])
        raise JobFailed(f"{len(failures)} chunks failed (rows {reasons}); fix the cause and re-run `producer enqueue`")
    missing = job.missing()
    if missing:
        raise JobFailed(
            f"{len(missing)} of {len(job.chunks)} chunks have no shard yet (rows {ranges([(c.start, c.stop) for c in missing])})"
        )


def shard_rows(job: Job) -> Iterator[np.ndarray]:
    """Each chunk's embeddings as float64, in row order, after checking they fit the job."""
    model = job.dir.pinned_model()
    for chunk in job.chunks:
        path = job.shard_path(chunk)
        try:
            meta, embeddings = read_shard(path)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: unreadable shard ({e}); delete it and re-run `producer enqueue`") from e
        if meta.model != model:
            raise InputError(f"{path}: made by model {meta.model}, but the job is pinned to {model}")
        yield embeddings.astype(np.float64)


class RowTaker:
    """Hands out the next n rows of a stream of arrays, across array boundaries."""

    def __init__(self, arrays: Iterator[np.ndarray]) -> None:
        self.arrays = arrays
        self.pending: list[np.ndarray] = []
        self.count = 0

    def take(self, n: int) -> np.ndarray:
        while self.count < n:
            block = next(self.arrays, None)
            if block is None:
                raise InputError("the CSV has more rows than the job has embeddings: the CSV changed since enqueue")
            self.pending.append(block)
            self.count += len(block)
        joined = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        head, tail = joined[:n], joined[n:]
        self.pending, self.count = ([tail] if len(tail) else []), len(tail)
        return head

    def exhausted(self) -> bool:
        return self.count == 0 and next(self.arrays, None) is None


def header_line(names: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([*names, *EMBEDDING_COLUMNS])
    return out.getvalue().encode()


def csv_lines(batch: pa.RecordBatch, embeddings: np.ndarray) -> pa.Buffer:
    """One block of output CSV: the frame's text columns as read, then e0..e127 in shortest round-trip form."""
    by_column = np.ascontiguousarray(embeddings.T)  # zero-copy Arrow columns
    columns = [*batch.columns, *(pa.array(by_column[i]) for i in range(EMBEDDING_SIZE))]
    table = pa.RecordBatch.from_arrays(columns, names=[*batch.schema.names, *EMBEDDING_COLUMNS])
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    return sink.getvalue()


def warm_up() -> None:
    """Let Arrow set up its number formatting (~0.2 s on first use), e.g. while workers load a model."""
    csv_lines(pa.record_batch([pa.array([""])], names=["_"]), np.zeros((1, EMBEDDING_SIZE)))


def finalize(job: Job, pca: PCA | None = None, threads: int | None = None) -> dict:
    """Write wavfile_embed.dat (N x 128 float64), wavfile_embed.csv (frame + e0..e127) and,
    with PCA params, wavfile_embed_pca.dat (N x 128 uint8). Returns a summary.

    Formatting 13.5 M floats as text is most of the work, so blocks of CSV are formatted on
    `threads` threads (default: one per core; Arrow releases the GIL) and written in order;
    at most two blocks per thread wait in memory, whatever N is.
    """
    began = time.perf_counter()
    check_complete(job)
    out = Path(job.out_dir)
    frame = Path(job.csv)
    names = csv_header(frame)
    taker = RowTaker(shard_rows(job))
    threads = threads or usable_cores()
    rows = 0
    paths = [out / OUTPUT_DAT, out / OUTPUT_CSV] + ([out / OUTPUT_PCA] if pca else [])
    with atomic_set(paths) as files, ThreadPoolExecutor(threads) as pool:
        dat, table_csv = files[:2]
        quantized = files[2] if pca else None
        table_csv.write(header_line(names))
        pending: deque[Future] = deque()
        for batch in csv_reader(frame, block_size=BLOCK_BYTES):
            embeddings = taker.take(batch.num_rows)
            embeddings.tofile(dat)
            if quantized is not None:
                pca.quantize(embeddings).tofile(quantized)
            pending.append(pool.submit(csv_lines, batch, embeddings))
            while len(pending) > 2 * threads:
                table_csv.write(pending.popleft().result())
            rows += batch.num_rows
        while pending:
            table_csv.write(pending.popleft().result())
        if rows != job.rows or not taker.exhausted():
            raise InputError(f"{frame} has {rows} rows but the job has {job.rows}: the CSV changed since enqueue")
    return {"rows": rows, "outputs": [str(p) for p in paths], "seconds": round(time.perf_counter() - began, 3)}
