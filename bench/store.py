"""Benchmark: a job's rows from an object store against the same rows from local disk.

    python bench/store.py [--rows 16384] [--plan-rows 20000] [--output-rows 105835] [--s3rver BIN] [--out bench/store.json]

The store is a process on a loopback port: moto's S3 server (the tests'), or with --s3rver the
npm package s3rver (`npm install --prefix /tmp/s3rver s3rver@3`, BIN its node_modules/.bin/s3rver),
which keeps objects in files and serves a range from the file; moto reads the whole object for
each ranged GET, so its feed falls as the object grows. Either way every byte passes through one
process of this 2-core machine: a floor, not what S3 gives. The measures:

- feed: one worker's chunk code (message, confinement, ranged read, fingerprint, shard write)
  as a GPU worker drives it (3 chunks in flight), with a STAND-IN model that returns zeros at
  once (bench/feed.py's): rows/s and bytes read per row, from the store and from local disk;
- plan: `plan_job` of a --plan-rows input on the store (its scan reads every chunk once, in
  parallel ranged parts), seconds and bytes read, against the same input on local disk. (moto
  holds an object in memory several times over: a 105,835-row input, 5.2 GB, had it killed for
  want of memory here, so the default is 20,000 rows, 983 MB, and the scan is linear in rows);
- outputs: a finished job of --output-rows rows (random embeddings in the project's shards, over a
  sparse .dat of zeros), its outputs written by `finalize`, then one more row and the `refresh` a
  watch makes: on local disk it appends; on the store it writes and uploads the whole set again.

Bytes read are counted in core.store.read_into, the one function every chunk read goes through.
Embeddings are never checked here: tests do that with the real model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.feed import InstantModel, in_flight, make_job  # noqa: E402
from bench.watch import synthetic_job  # noqa: E402
from vggish_pipeline.core.spectrogram import ROW_BYTES  # noqa: E402


def start_store(port: int, s3rver: str | None, work: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    if s3rver:
        (work / "s3rver").mkdir()
        command = [s3rver, "-d", str(work / "s3rver"), "-a", "127.0.0.1", "-p", str(port), "--silent"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)


def counted() -> dict:
    """Count the bytes every chunk read asks for (core.store.read_into, wrapped where it is called)."""
    from vggish_pipeline.core import spectrogram, store

    tally = {"bytes": 0}
    real = store.read_into

    def read_into(loc, offset, buffer):
        got = real(loc, offset, buffer)
        tally["bytes"] += got
        return got

    spectrogram.read_into = read_into  # the name RowReader calls
    return tally


def feed(job, roots, tally: dict, repeat: int = 2) -> dict:
    from vggish_pipeline.core import store
    from worker.chunk import ChunkRunner

    best, read = float("inf"), 0
    for _ in range(repeat):
        for name in store.names(job.dir.shards):
            store.remove(job.dir.shards / name)
        runner = ChunkRunner(InstantModel(), roots, "bench")
        messages = [job.message(c).encode() for c in job.chunks]
        tally["bytes"] = 0
        began = time.perf_counter()
        with ThreadPoolExecutor(in_flight()) as pool:
            list(pool.map(runner.run, messages))
        best, read = min(best, time.perf_counter() - began), tally["bytes"]
    return {"rows": job.rows, "chunk_rows": job.chunk_rows, "in_flight": in_flight(), "seconds": round(best, 3),
            "rows_per_s": round(job.rows / best), "bytes_read_per_row": read / job.rows, "mb_per_s": round(read / best / 1e6)}


def plan(spec, csv, out, tally: dict, chunk_rows: int) -> dict:
    from producer.plan import plan_job

    tally["bytes"] = 0
    began = time.perf_counter()
    job = plan_job(spec, csv, out, chunk_rows=chunk_rows, model=InstantModel.fingerprint).job
    seconds = time.perf_counter() - began
    return {"rows": job.rows, "chunks": len(job.chunks), "seconds": round(seconds, 2), "spec_bytes_read": tally["bytes"],
            "spec_bytes": job.rows * ROW_BYTES, "mb_per_s": round(tally["bytes"] / seconds / 1e6)}


def outputs_cost(where, work: Path, rows: int) -> dict:
    """finalize of a finished job, then one more row and a watch's refresh."""
    import numpy as np

    from producer.finalize import finalize, refresh
    from vggish_pipeline.core.job import Chunk
    from vggish_pipeline.core.shard import ShardMeta, write_shard
    from vggish_pipeline.core.spectrogram import NEW_DIGEST, digest

    job = synthetic_job(where, work, rows, InstantModel.fingerprint)
    one = digest(np.zeros((1, 96, 64)), NEW_DIGEST)
    began = time.perf_counter()
    finalize(job)
    whole = time.perf_counter() - began
    with open(job.source, "r+b") as f:
        f.truncate((rows + 1) * ROW_BYTES)
    with open(job.csv, "a") as f:
        f.write(f"{rows},new/c.wav,yes,False\n")
    job.rows += 1
    job.chunks.append(Chunk(rows, rows + 1, one))
    write_shard(job.dir.shards, ShardMeta(rows, rows + 1, one, "relu", InstantModel.fingerprint, "bench", 1.0), np.zeros((1, 128), np.float32))
    job.save()
    began = time.perf_counter()
    written = refresh(job)
    return {"rows": rows, "finalize_seconds": round(whole, 2), "refresh_one_row_seconds": round(time.perf_counter() - began, 2),
            "refresh_appended": written.appended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16_384)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--plan-rows", type=int, default=20_000)
    parser.add_argument("--output-rows", type=int, default=105_835)
    parser.add_argument("--s3rver", help="the s3rver binary: serve from it instead of moto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "store.json")
    args = parser.parse_args()
    port = 5000 + os.getpid() % 1000
    key = "S3RVER" if args.s3rver else "bench"  # s3rver's own default credentials
    os.environ.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=key, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                      AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    import s3fs

    from vggish_pipeline.core.store import location

    work = Path(tempfile.mkdtemp(prefix="vggish-bench-store-"))
    server = start_store(port, args.s3rver, work)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench-store")
        tally = counted()
        local_job = make_job(work / "feed", args.rows, args.chunk_rows)
        for name in ("wavfile_spec.dat", "wavfile_df.csv"):
            fs.put_file(str(work / "feed" / name), f"bench-store/feed/{name}")
        from producer.plan import plan_job

        stored = location("s3://bench-store/feed")
        stored_job = plan_job(stored / "wavfile_spec.dat", stored / "wavfile_df.csv", stored, chunk_rows=args.chunk_rows,
                              model=InstantModel.fingerprint).job
        results = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "store": f"{'s3rver (node, objects in files)' if args.s3rver else 'moto server (one Python process)'} on loopback",
            "feed_local": feed(local_job, [work], tally),
            "feed_store": feed(stored_job, [stored], tally),
        }
        shutil.rmtree(work / "feed")
        big = make_job(work / "plan", args.plan_rows, args.chunk_rows)
        for name in ("wavfile_spec.dat", "wavfile_df.csv"):
            fs.put_file(str(work / "plan" / name), f"bench-store/plan/{name}")
        results["plan_local"] = plan(work / "plan" / "wavfile_spec.dat", work / "plan" / "wavfile_df.csv", work / "plan", tally, big.chunk_rows)
        bucket = location("s3://bench-store/plan")
        results["plan_store"] = plan(bucket / "wavfile_spec.dat", bucket / "wavfile_df.csv", bucket / "job", tally, big.chunk_rows)
        shutil.rmtree(work / "plan")
        results["outputs_local"] = outputs_cost(work / "out", work / "out", args.output_rows)
        results["outputs_store"] = outputs_cost(location("s3://bench-store/out"), work / "pair", args.output_rows)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
