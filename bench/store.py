"""Benchmark: a job's rows from an object store against the same rows from local disk.

    python bench/store.py [--rows 16384] [--plan-rows 105835] [--out bench/store.json]

The store is moto's S3 server, a process on a loopback port: a real HTTP store, but one whose
every byte passes through one Python process on this 2-core machine, so its numbers are a floor,
not what S3 gives. Two measures:

- feed: one worker's chunk code (message, confinement, ranged read, fingerprint, shard write)
  as a GPU worker drives it (3 chunks in flight), with a STAND-IN model that returns zeros at
  once (bench/feed.py's): rows/s and bytes read per row, from the store and from local disk;
- plan: `plan_job` of a --plan-rows input on the store (its scan reads every chunk once, in
  parallel ranged parts), seconds and bytes read, against the same input on local disk.

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

ROW_BYTES = 96 * 64 * 8


def start_store(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16_384)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--plan-rows", type=int, default=105_835)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "store.json")
    args = parser.parse_args()
    port = 5000 + os.getpid() % 1000
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                      AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    import s3fs

    from vggish_pipeline.core.store import location

    work = Path(tempfile.mkdtemp(prefix="vggish-bench-store-"))
    server = start_store(port)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        tally = counted()
        local_job = make_job(work / "feed", args.rows, args.chunk_rows)
        for name in ("wavfile_spec.dat", "wavfile_df.csv"):
            fs.put_file(str(work / "feed" / name), f"bench/feed/{name}")
        from producer.plan import plan_job

        stored = location("s3://bench/feed")
        stored_job = plan_job(stored / "wavfile_spec.dat", stored / "wavfile_df.csv", stored, chunk_rows=args.chunk_rows,
                              model=InstantModel.fingerprint).job
        results = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "store": "moto server (one Python process) on loopback",
            "feed_local": feed(local_job, [work], tally),
            "feed_store": feed(stored_job, [stored], tally),
        }
        shutil.rmtree(work / "feed")
        big = make_job(work / "plan", args.plan_rows, args.chunk_rows)
        for name in ("wavfile_spec.dat", "wavfile_df.csv"):
            fs.put_file(str(work / "plan" / name), f"bench/plan/{name}")
        results["plan_local"] = plan(work / "plan" / "wavfile_spec.dat", work / "plan" / "wavfile_df.csv", work / "plan", tally, big.chunk_rows)
        bucket = location("s3://bench/plan")
        results["plan_store"] = plan(bucket / "wavfile_spec.dat", bucket / "wavfile_df.csv", bucket / "job", tally, big.chunk_rows)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
