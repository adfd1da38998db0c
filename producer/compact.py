"""Compaction: re-cut a job's chunks, from its first small one on, into chunks of the job's size.

A watch adds a chunk (and its shard) per refresh; a year of it would leave ~175,000 one-row
shards for every plan, status and finalize to read; a recording longer than a chunk leaves a full
chunk and a small one each time. The rows' embeddings are in their shards already, so a re-cut
embeds nothing: it joins them and slices them into shards of the new chunks. Only the rows since
the last re-cut are read again (the chunks before the first small one are all full).

Crash-safe by order: (1) the merged shards are written (write-once, under new names); (2) job.json
names the merged chunks (written whole); (3) the outputs' manifest, which lists the chunks the
outputs hold, is rewritten to match (the outputs' bytes do not change); (4) the small shards go.
A crash before (2) leaves the old job whole (the next plan or compaction removes the unused merged
shards, or this one finds them made); after it, the next compaction (or plan) removes the small
ones; between (2) and (3) the next refresh rewrites the outputs whole, with the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from producer.outputs import MANIFEST, read_manifest
from vggish_pipeline.core import store
from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.files import atomic_write
from vggish_pipeline.core.job import Job
from vggish_pipeline.core.shard import ShardMeta, read_shard, write_shard

COMPACT_AFTER = 32  # small chunks a watch lets gather before it merges them
MERGED = "merged"  # the worker a merged shard names: its rows were embedded by the workers of the shards it joins


@dataclass(frozen=True)
class Compacted:
    """What a compaction did: chunks before and after, and the rows their merged shards hold."""

    chunks_before: int
    chunks_after: int
    merged_rows: int

    def to_dict(self) -> dict:
        return {"chunks_before": self.chunks_before, "chunks_after": self.chunks_after, "merged_rows": self.merged_rows}


REWRITES = "compact (it rewrites the outputs' manifest in place)"


def compact_job(out_dir: store.Location) -> Compacted:
    """`producer compact DIR`: compact the job in DIR, holding its input's lock, so that no watch or
    add-clips writes while it runs (one that holds it makes this a one-line error)."""
    from producer.clips import locked

    job = Job.load(store.local(out_dir, REWRITES))
    spec, csv_path = Path(job.source), Path(job.csv)
    for path in (spec, csv_path):
        if not path.exists():
            raise InputError(f"{path}: the job's input is gone; nothing to check its chunks against")
    with locked(spec, csv_path):
        return compact(Job.load(out_dir))


def small_chunks(job: Job) -> int:
    return sum(c.rows < job.chunk_rows for c in job.chunks)


def compact(job: Job) -> Compacted:
    """Re-cut `job`'s chunks from its first small one on into chunks of the job's size, from their
    shards (sliced and joined: nothing is embedded again). Done only when there are two small chunks
    or more there, every one has its shard, and their rows are unchanged in the source (else the next
    plan re-embeds them, and this leaves them). The caller keeps other writers of the job away (the
    input's lock). Returns what it did; the job on disk is the compacted one."""
    from producer.dataset import scan  # Arrow: not for `producer --help`
    from producer.finalize import repair

    out = store.local(store.location(job.out_dir), REWRITES)
    repair(out)
    missing = job.missing()
    if missing:
        raise InputError(f"{out}: {len(missing)} chunks have no shard yet; compact a job once it is embedded")
    record = read_manifest(out)
    held = record.get("chunks") if record is not None else None
    if held is not None and held != [[c.start, c.stop, c.digest] for c in job.chunks[: len(held)]]:
        held = None  # outputs of another plan: the next refresh rewrites them whole anyway
    within = job.chunks[: len(held)] if held is not None else job.chunks  # outputs that append on hold these: re-cut only those
    first = next((i for i, c in enumerate(within) if c.rows < job.chunk_rows), len(within))
    run = within[first:]
    spec, model = Path(job.source), job.dir.pinned_model()
    unchanged = sum(c.rows < job.chunk_rows for c in run) >= 2 and scan(spec, [(c.start, c.stop) for c in run], job.digest_scheme) == run
    shards = [read_shard(job.shard_path(c)) for c in run] if unchanged else []
    if not unchanged or any(meta.model != model for meta, _ in shards):
        job.drop_unused_shards()  # a crash's leftovers: small shards of chunks job.json no longer names
        return Compacted(len(job.chunks), len(job.chunks), 0)
    start, stop, size = run[0].start, run[-1].stop, job.chunk_rows
    embeddings = np.concatenate([e for _, e in shards])
    recut = scan(spec, [(a, min(a + size, stop)) for a in range(start, stop, size)], job.digest_scheme)
    seconds = sum(m.seconds for m, _ in shards) / max(stop - start, 1)
    for c in recut:  # write-once: one left by a crash before job.json was saved is the same shard
        meta = ShardMeta(c.start, c.stop, c.digest, job.embedding, model or "", MERGED, round(seconds * c.rows, 3))
        write_shard(job.dir.shards, meta, embeddings[c.start - start : c.stop - start])
    chunks = [*within[:first], *recut, *job.chunks[len(within) :]]
    compacted = replace(job, chunks=chunks)
    compacted.save()
    if held is not None and record is not None:
        record["chunks"] = [[c.start, c.stop, c.digest] for c in [*within[:first], *recut]]
        with atomic_write(out / MANIFEST) as f:
            f.write(json.dumps(record, separators=(",", ":")).encode())
    compacted.drop_unused_shards()
    return Compacted(len(job.chunks), len(chunks), stop - start)
