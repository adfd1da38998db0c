"""Compaction: merge a job's runs of small consecutive chunks into chunks of the job's size.

A watch adds a chunk (and its shard) per refresh; a year of it would leave ~175,000 one-row
shards for every plan, status and finalize to read. The rows' embeddings are in their shards
already, so a merge re-embeds nothing: it concatenates them into one shard of the merged rows.

Crash-safe by order: (1) the merged shards are written (write-once, under new names); (2) job.json
names the merged chunks (written whole); (3) the outputs' manifest, which lists the chunks the
outputs hold, is rewritten to match (the outputs' bytes do not change); (4) the small shards go.
A crash before (2) leaves the old job whole, and the next compaction uses the merged shards it
finds; after it, the next compaction (or plan) removes the small ones; between (2) and (3) the next refresh rewrites the
outputs in full rather than appending, with the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from producer.outputs import MANIFEST
from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.files import atomic_write
from vggish_pipeline.core.job import Chunk, Job
from vggish_pipeline.core.shard import ShardMeta, read_shard, write_shard

COMPACT_AFTER = 32  # small chunks a watch lets gather before it merges them


@dataclass(frozen=True)
class Compacted:
    """What a compaction did: chunks before and after, and the rows their merged shards hold."""

    chunks_before: int
    chunks_after: int
    merged_rows: int

    def to_dict(self) -> dict:
        return {"chunks_before": self.chunks_before, "chunks_after": self.chunks_after, "merged_rows": self.merged_rows}


def compact_job(out_dir: Path) -> Compacted:
    """`producer compact DIR`: compact the job in DIR, holding its input's lock, so that no watch or
    add-clips writes while it runs (one that holds it makes this a one-line error)."""
    from producer.clips import locked

    job = Job.load(out_dir)
    spec, csv_path = Path(job.source), Path(job.csv)
    for path in (spec, csv_path):
        if not path.exists():
            raise InputError(f"{path}: the job's input is gone; nothing to check its chunks against")
    with locked(spec, csv_path):
        return compact(Job.load(out_dir))


def small_chunks(job: Job) -> int:
    return sum(c.rows < job.chunk_rows for c in job.chunks)


def groups(chunks: list[Chunk], size: int) -> list[list[Chunk]]:
    """Runs of consecutive chunks smaller than `size`, each cut to at most `size` rows; only runs of two or more."""
    runs: list[list[Chunk]] = []
    run: list[Chunk] = []
    for chunk in [*chunks, None]:
        if chunk is not None and chunk.rows < size and (not run or sum(c.rows for c in run) + chunk.rows <= size):
            run.append(chunk)
            continue
        if len(run) > 1:
            runs.append(run)
        run = [chunk] if chunk is not None and chunk.rows < size else []
    return runs


def held_chunks(out: Path) -> list[list] | None:
    """The chunks the outputs' manifest says the outputs hold; None without outputs."""
    try:
        return json.loads((out / MANIFEST).read_bytes())["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compact(job: Job) -> Compacted:
    """Merge `job`'s runs of small chunks (see `groups`) whose shards are all there and whose rows are
    unchanged in the source; the caller keeps other writers of the job away (the input's lock).
    Returns what it did; the job on disk is the compacted one."""
    from producer.dataset import scan  # Arrow: not for `producer --help`
    from producer.finalize import repair

    out = Path(job.out_dir)
    repair(out)
    held = held_chunks(out)
    if held is not None and held != [[c.start, c.stop, c.digest] for c in job.chunks[: len(held)]]:
        held = None  # outputs of another plan: the next refresh rewrites them whole anyway
    within = job.chunks[: len(held)] if held is not None else job.chunks  # outputs that append on hold these: merge only those
    model = job.dir.pinned_model()
    merged: dict[int, Chunk] = {}  # first chunk's start -> the merged chunk
    replaced: dict[int, list[Chunk]] = {}
    spec = Path(job.source)
    for run in groups(within, job.chunk_rows):
        paths = [job.shard_path(c) for c in run]
        if not all(p.exists() for p in paths):
            continue
        if scan(spec, [(c.start, c.stop) for c in run], job.digest_scheme) != run:
            continue  # rows changed since they were embedded: the next plan re-embeds them, not this
        shards = [read_shard(p) for p in paths]
        if any(meta.model != model for meta, _ in shards):
            continue
        chunk = scan(spec, [(run[0].start, run[-1].stop)], job.digest_scheme)[0]
        meta = ShardMeta(chunk.start, chunk.stop, chunk.digest, job.embedding, model or "", "compact",
                         round(sum(m.seconds for m, _ in shards), 3))
        write_shard(job.dir.shards, meta, np.concatenate([e for _, e in shards]))  # False: made before a crash
        merged[run[0].start] = chunk
        replaced[run[0].start] = run
    if not merged:
        job.drop_unused_shards()  # a crash's leftovers: small shards of chunks job.json no longer names
        return Compacted(len(job.chunks), len(job.chunks), 0)
    gone = {c.start for run in replaced.values() for c in run}
    chunks = []
    for c in job.chunks:
        if c.start in merged:
            chunks.append(merged[c.start])
        elif c.start not in gone:
            chunks.append(c)
    compacted = replace(job, chunks=chunks)
    compacted.save()
    if held is not None:
        record = json.loads((out / MANIFEST).read_bytes())
        record["chunks"] = [[c.start, c.stop, c.digest] for c in chunks if c.stop <= within[-1].stop]
        with atomic_write(out / MANIFEST) as f:
            f.write(json.dumps(record, separators=(",", ":")).encode())
    compacted.drop_unused_shards()
    return Compacted(len(job.chunks), len(chunks), sum(c.rows for c in merged.values()))

