"""The finalizer: merge a job's shards, in row order, into the seed notebook's output files.

It streams: a few CSV blocks and the shards under them are in memory at a time, whatever N is.
The outputs are published as one set (vggish_pipeline.core.files.atomic_set): a crash leaves the old set or the
new one, never a torn file or files of both; re-running finalize is always safe.

Beside them, `wavfile_embed.manifest.json` says what they hold: the chunks, model, embedding
form, PCA params and the input CSV bytes they were made from, and each file's size. When a job
has only grown since (its earlier chunks and CSV bytes unchanged), `refresh` appends the new rows
to the outputs in place (vggish_pipeline.core.files.append_together): O(new rows), whatever N is.

A job folder on an object store cannot append: its outputs are written whole each time, into a
local temp folder, then uploaded one object at a time with the manifest last (`publish`), so a
reader that finds a manifest finds every object it names, at the sizes it names.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from producer.dataset import Known, csv_header, csv_reader, index_column
from producer.outputs import EMBEDDING_COLUMNS, MANIFEST, OUTPUT_PARQUET, Written, embeddings, output_paths
from vggish_pipeline.core import store
from vggish_pipeline.core.devices import usable_cores
from vggish_pipeline.core.errors import InputError, JobFailed
from vggish_pipeline.core.files import APPEND_JOURNAL, append_together, atomic_set, atomic_write, finish_set, settle_append
from vggish_pipeline.core.job import Job
from vggish_pipeline.core.postprocess import PCA
from vggish_pipeline.core.shard import EMBEDDING_SIZE, read_shard

PARQUET_GROUP_ROWS = 65_536
BLOCK_BYTES = 1 << 16  # of input CSV per block: ~1,900 rows, ~2.5 MB of output text


def ranges(pairs: list[tuple[int, int]], limit: int = 6) -> str:
    shown = ", ".join(f"{a}-{b}" for a, b in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def repair(out: Path) -> None:
    """Settle what a crash cut short in `out` before the outputs are read or written: a set whose
    publication began is completed; an append is done if its manifest is in place, else cut back."""
    finish_set(out)
    settle_append(out / APPEND_JOURNAL)


def check_complete(job: Job) -> None:
    """Refuse, naming row ranges, unless every chunk has exactly the shard the plan asks for."""
    failures = job.failures()
    if failures:
        reasons = "; ".join(f"{f.start}-{f.stop}: {f.reason}" for f in failures[:3])
        raise JobFailed(f"{len(failures)} chunks failed (rows {reasons}); fix the cause and re-run `producer enqueue`")
    missing = job.missing()
    if missing:
        raise JobFailed(
            f"{len(missing)} of {len(job.chunks)} chunks have no shard yet (rows {ranges([(c.start, c.stop) for c in missing])})"
        )


def shard_rows(job: Job, first: int = 0) -> Iterator[np.ndarray]:
    """Each chunk's embeddings (from chunk `first` on) as float64, in row order, after checking they fit the job."""
    model = job.dir.pinned_model()
    for chunk in job.chunks[first:]:
        path = job.shard_path(chunk)
        meta, embeddings = read_shard(path)
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


def finalize(
    job: Job, pca: PCA | None = None, threads: int | None = None, known: Known | None = None, out: Path | None = None,
    parquet: bool = False,
) -> Written:
    """Write wavfile_embed.dat (N x 128 float64), wavfile_embed.csv (frame + e0..e127) and,
    with PCA params, wavfile_embed_pca.dat (N x 128 uint8), and their manifest, in the job's
    folder (or `out`); with `parquet`, then wavfile_embed.parquet. Returns a summary. A job
    folder on a store: see `publish`.

    Formatting 13.5 M floats as text is most of the work, so blocks of CSV are formatted on
    `threads` threads (default: one per core; Arrow releases the GIL) and written in order;
    at most two blocks per thread wait in memory, whatever N is. `known`: see refresh.
    """
    if out is None and store.remote(job.dir.path):
        return publish(job, pca, parquet, threads)
    began = time.perf_counter()
    check_complete(job)
    out = out or Path(job.out_dir)
    repair(out)
    csv_path = store.location(job.csv)
    names = csv_header(csv_path)
    taker = RowTaker(shard_rows(job))
    threads = threads or usable_cores()
    rows = 0
    paths = output_paths(out, pca is not None)
    with atomic_set([*paths, out / MANIFEST]) as files, ThreadPoolExecutor(threads) as pool:
        dat, table_csv = files[:2]
        quantized = files[2] if pca else None
        table_csv.write(header_line(names))
        pending: deque[Future] = deque()
        for batch in csv_reader(csv_path, block_size=BLOCK_BYTES):
            embeddings = taker.take(batch.num_rows)
            embeddings.tofile(dat)
            if quantized is not None and pca is not None:
                pca.quantize(embeddings).tofile(quantized)
            pending.append(pool.submit(csv_lines, batch, embeddings))
            while len(pending) > 2 * threads:
                table_csv.write(pending.popleft().result())
            rows += batch.num_rows
        while pending:
            table_csv.write(pending.popleft().result())
        if rows != job.rows or not taker.exhausted():
            raise InputError(f"{csv_path} has {rows} rows but the job has {job.rows}: the CSV changed since enqueue")
        sizes = {p.name: f.tell() for p, f in zip(paths, files, strict=False)}  # files[-1]: the manifest
        known = known or Known()
        csv_bytes, csv_hash = known.csv_digest(csv_path)
        files[-1].write(manifest(job, pca, sizes, csv_bytes, csv_hash.hexdigest()))
    known.remember(csv_path, csv_bytes, csv_hash)
    written = [*paths, write_parquet(job, out)] if parquet else paths
    return Written(rows, [str(p) for p in written], appended=False, seconds=round(time.perf_counter() - began, 3))


def manifest(job: Job, pca: PCA | None, sizes: dict[str, int], csv_bytes: int, csv_digest: str) -> bytes:
    record = {
        "rows": job.rows,
        "chunks": [[c.start, c.stop, c.digest] for c in job.chunks],
        "embedding": job.embedding,
        "model": job.dir.pinned_model(),
        "pca": pca.digest if pca else None,
        "csv_bytes": csv_bytes,
        "csv_digest": csv_digest,
        "sizes": sizes,
    }
    return json.dumps(record, separators=(",", ":")).encode()


def publish(job: Job, pca: PCA | None = None, parquet: bool = False, threads: int | None = None) -> Written:
    """The outputs of a job whose folder is on a store: finalized whole into a local temp folder,
    then uploaded, the data objects first and the manifest last (a PUT is atomic: the commit point).
    It names each object's size and ETag, so a reader can tell a set being replaced (outputs.fetched)."""
    began = time.perf_counter()
    target = job.dir.path
    assert store.remote(target) and not isinstance(target, Path)
    check_complete(job)  # before anything is staged
    with tempfile.TemporaryDirectory(prefix="vggish-outputs-") as staging:
        local = Path(staging)
        files = [Path(p) for p in finalize(job, pca, threads, out=local, parquet=parquet).outputs]
        etags = {f.name: store.upload(f, target / f.name) for f in files}  # one at a time, each in parallel parts
        record = {**json.loads((local / MANIFEST).read_bytes()), "etags": etags}
        store.write(target / MANIFEST, json.dumps(record, separators=(",", ":")).encode())
    return Written(job.rows, [str(target / f.name) for f in files], appended=False, seconds=round(time.perf_counter() - began, 3))


def refresh(job: Job, pca: PCA | None = None, parquet: bool = False, known: Known | None = None) -> Written:
    """The outputs for the job as it is now: new rows appended in place when the job only grew
    since the outputs were made (see the module's doc), else a full finalize. With `parquet`,
    also wavfile_embed.parquet, written whole each time (a Parquet file cannot grow in place).
    `known`: the input CSV's digest so far, kept by the pair's one writer (a watch), so that only
    the bytes it appended since are read; without it the whole CSV is read to check it.
    On a store, the outputs are written whole every time (`publish`)."""
    if store.remote(job.dir.path):
        return publish(job, pca, parquet)
    repair(Path(job.out_dir))
    known = known or Known()
    written = extend(job, pca, known)
    if written is None:
        return finalize(job, pca, known=known, parquet=parquet)
    if parquet:
        written = replace(written, outputs=[*written.outputs, str(write_parquet(job))])
    return written


def write_parquet(job: Job, out: Path | None = None) -> Path:
    """wavfile_embed.parquet: the frame's columns as pandas reads the CSV (its unnamed index column
    as the index), then e0..e127 from wavfile_embed.dat, in row groups; replaced whole, atomically.
    `pd.read_parquet` gives the frame that `pd.read_csv(..., index_col=0)` gives of the output CSV.
    In the job's folder, or in `out` (a publish's staging)."""
    import pandas as pd
    import pyarrow.parquet as pq

    out = out or Path(job.out_dir)
    csv_path = store.location(job.csv)
    with csv_path.open("rb") as f:
        frame = pd.read_csv(f, index_col=index_column(csv_header(csv_path)))
    embedded = embeddings(out, job.rows)
    path = out / OUTPUT_PARQUET
    with atomic_write(path) as f:
        writer = None
        for start in range(0, max(job.rows, 1), PARQUET_GROUP_ROWS):
            group = pa.Table.from_pandas(frame.iloc[start : start + PARQUET_GROUP_ROWS], preserve_index=True)
            block = np.ascontiguousarray(embedded[start : start + PARQUET_GROUP_ROWS].T)
            for i, name in enumerate(EMBEDDING_COLUMNS):
                group = group.append_column(name, pa.array(block[i]))
            writer = writer or pq.ParquetWriter(f, group.schema)
            writer.write_table(group)
        if writer is not None:
            writer.close()
    return path


def extend(job: Job, pca: PCA | None, known: Known) -> Written | None:
    """Append the rows of the chunks the outputs lack; None if they are not a prefix of the job."""
    began = time.perf_counter()
    out = Path(job.out_dir)
    try:
        held = json.loads((out / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    chunks = [[c.start, c.stop, c.digest] for c in job.chunks]
    paths = output_paths(out, pca is not None)
    same = (
        held.get("chunks") == chunks[: len(held.get("chunks", []))]
        and held.get("embedding") == job.embedding
        and held.get("model") == job.dir.pinned_model()
        and held.get("pca") == (pca.digest if pca else None)
        and held.get("sizes") == {p.name: p.stat().st_size if p.exists() else -1 for p in paths}
    )
    if not same:
        return None
    csv_bytes, csv_hash = known.csv_digest(Path(job.csv), held["csv_bytes"])
    if (csv_bytes, csv_hash.hexdigest()) != (held["csv_bytes"], held["csv_digest"]):
        return None
    known.remember(Path(job.csv), csv_bytes, csv_hash)
    check_complete(job)
    def done() -> Written:
        return Written(job.rows, [str(p) for p in paths], appended=True, seconds=round(time.perf_counter() - began, 3))

    if len(held["chunks"]) == len(chunks):
        return done()  # nothing new: they are up to date
    with open(job.csv, "rb") as f:
        f.seek(csv_bytes)
        tail = f.read()
    csv_hash.update(tail)  # the whole CSV's digest, reading only the tail again
    new_rows = job.rows - held["rows"]
    batch = read_tail(job, tail)
    if batch.num_rows != new_rows:
        return None  # the CSV gained rows in another way than the .dat: let finalize say what is wrong
    embeddings = np.concatenate(list(shard_rows(job, first=len(held["chunks"]))))
    appends = [(paths[0], embeddings.tobytes()), (paths[1], csv_lines(batch, embeddings).to_pybytes())]
    if pca:
        appends.append((paths[2], pca.quantize(embeddings).tobytes()))
    sizes = {p.name: held["sizes"][p.name] + len(data) for p, (_, data) in zip(paths, appends, strict=True)}
    append_together(appends, out / APPEND_JOURNAL, (out / MANIFEST, manifest(job, pca, sizes, csv_bytes + len(tail), csv_hash.hexdigest())))
    known.remember(Path(job.csv), csv_bytes + len(tail), csv_hash)
    return done()


def read_tail(job: Job, tail: bytes) -> pa.RecordBatch:
    """The CSV rows in `tail` (bytes after a whole line), read exactly as finalize reads the file."""
    table = csv_reader(io.BytesIO(tail), header=csv_header(Path(job.csv)), skip_header=False).read_all()
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.record_batch([])
