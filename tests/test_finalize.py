"""Finalize on a job larger than many CSV blocks: order, quoting and values survive the threaded writer."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
from outputs import E_COLUMNS

from producer.finalize import finalize
from producer.outputs import OUTPUT_CSV, OUTPUT_DAT
from vggish_pipeline.core.job import Chunk, Job
from vggish_pipeline.core.shard import ShardMeta, read_shard, write_shard


def finished_job(directory, rows: int, chunk_rows: int = 700) -> tuple[Job, np.ndarray]:
    """A job whose every chunk has a shard, with a frame full of text that needs quoting."""
    rng = np.random.default_rng(3)
    with open(directory / "frame.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "file_name", "label", "valid"])
        for i in range(rows):
            w.writerow([i, f'take {i}, "loud".wav' if i % 7 == 0 else f"yes/ü_{i}.wav", "yes,no" if i % 3 else "up", i % 5 == 0])
    chunks = [Chunk(s, min(s + chunk_rows, rows), f"{s:032x}") for s in range(0, rows, chunk_rows)]
    job = Job("t", str(directory), str(directory / "spec.dat"), str(directory / "frame.csv"), rows, chunk_rows, "relu", chunks)
    job.dir.ensure()
    job.dir.pin_model("m")
    embeddings = np.maximum(rng.standard_normal((rows, 128), dtype=np.float32), 0)
    for c in chunks:
        write_shard(job.dir.shards, ShardMeta(c.start, c.stop, c.digest, "relu", "m", "test", 1.0), embeddings[c.start : c.stop])
    job.save()
    return job, embeddings.astype(np.float64)


def test_threaded_finalize_keeps_row_order_quoting_and_every_bit(tmp_path):
    job, expected = finished_job(tmp_path, rows=9_000)
    finalize(job, threads=3)
    dat = np.fromfile(tmp_path / OUTPUT_DAT).reshape(-1, 128)
    np.testing.assert_array_equal(dat, expected)
    table = pd.read_csv(tmp_path / OUTPUT_CSV, index_col=0)
    frame = pd.read_csv(tmp_path / "frame.csv", index_col=0)
    pd.testing.assert_frame_equal(table[frame.columns], frame)
    np.testing.assert_array_equal(table[E_COLUMNS].to_numpy().view(np.int64), expected.view(np.int64))

    first = (tmp_path / OUTPUT_CSV).read_bytes()
    finalize(job, threads=1)
    assert (tmp_path / OUTPUT_CSV).read_bytes() == first  # the same bytes however many threads format


def test_a_shard_is_written_once_and_the_first_is_kept(tmp_path):
    """A worker cut off while another re-ran its chunk finishes late: its copy is dropped, so a
    shard that a finalize may already have read is never replaced (tests/test_hosts.py: the real case)."""
    meta = ShardMeta(0, 2, "0" * 32, "relu", "m", "first", 1.0)
    assert write_shard(tmp_path, meta, np.ones((2, 128)))
    inode = (tmp_path / meta.name).stat().st_ino
    late = ShardMeta(0, 2, "0" * 32, "relu", "m", "late", 1.0)
    assert not write_shard(tmp_path, late, np.zeros((2, 128)))
    kept, embeddings = read_shard(tmp_path / meta.name)
    assert kept.worker == "first" and (embeddings == 1).all() and (tmp_path / meta.name).stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == [meta.name]  # no temp file left
