"""Benchmark: what one worker can feed a fast GPU, with the model LEFT OUT.

    python bench/feed.py [--rows 32768] [--out bench/feed.json]

The model is a STAND-IN object, not VGGish: everything else is the project's real chunk code
(message decode, path checks, read, fingerprint, shard write) and, for the overhead measure, a
real Celery worker process and a real Redis. Two measures:

- ceiling: rows/s of the chunk code with a stand-in that returns zeros at once, driven as the
  worker drives it (as many chunks at a time as it keeps in flight);
- overhead: a stand-in that takes exactly rows / 100,000 s per chunk, releasing the GIL as
  TensorFlow does on a GPU, served by a real worker process; the time a job takes beyond that
  compute, per chunk and as a share of compute.

Results of embeddings are never checked here: tests do that with the real model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_RATE = 100_000  # rows/s the paced stand-in computes at: a fast GPU (BENCHMARKS.md has the arithmetic)


class InstantModel:
    """STAND-IN, not VGGish: zeros at once, so only the code around the model is timed."""

    fingerprint = "stand-in"
    device = "stand-in"

    def padded_rows(self, count: int) -> int:
        return count

    def embed(self, rows: np.ndarray, form: str, count: int | None = None) -> np.ndarray:
        return np.zeros((len(rows) if count is None else count, 128), np.float32)


class PacedModel(InstantModel):
    """STAND-IN, not VGGish: takes rows / rate seconds without the GIL, like a GPU's session.run,
    and notes when each call began and ended in `times` (a file), for the gaps between them."""

    def __init__(self, rate: float, times: Path) -> None:
        self.rate = rate
        self.times = open(times, "a", buffering=1)

    def embed(self, rows: np.ndarray, form: str, count: int | None = None) -> np.ndarray:
        began = time.perf_counter()
        time.sleep(len(rows) / self.rate)
        self.times.write(f"{began} {time.perf_counter()}\n")
        return super().embed(rows, form, count)


def make_job(directory: Path, rows: int, chunk_rows: int):
    """A job of `rows` random spectrograms cut into `chunk_rows` chunks, pinned to the stand-in."""
    from producer.plan import plan_job
    from vggish_pipeline.core.spectrogram import ROW_VALUES

    directory.mkdir(parents=True, exist_ok=True)
    spec, frame = directory / "wavfile_spec.dat", directory / "wavfile_df.csv"
    if not spec.exists() or spec.stat().st_size != rows * ROW_VALUES * 8:
        rng = np.random.default_rng(0)
        with open(spec, "wb") as f:
            for start in range(0, rows, 1024):
                rng.standard_normal((min(1024, rows - start)) * ROW_VALUES).tofile(f)
        with open(frame, "w") as f:
            f.write(",file_name,label,valid\n")
            f.writelines(f"{i},c{i}.wav,yes,False\n" for i in range(rows))
    shutil.rmtree(directory / "shards", ignore_errors=True)
    (directory / "job.json").unlink(missing_ok=True)
    (directory / "model.json").unlink(missing_ok=True)
    return plan_job(spec, frame, directory, chunk_rows=chunk_rows, model=InstantModel.fingerprint).job


def in_flight() -> int:
    """Chunks a GPU worker keeps in flight (1 before pipelining existed)."""
    from worker import chunk

    return getattr(chunk, "GPU_IN_FLIGHT", 1)


def ceiling(work: Path, rows: int, chunk_rows: int, repeat: int = 3) -> dict:
    from worker.chunk import ChunkRunner

    best = float("inf")
    for _ in range(repeat):
        job = make_job(work / "ceiling", rows, chunk_rows)
        runner = ChunkRunner(InstantModel(), [work], "bench")
        messages = [job.message(c).encode() for c in job.chunks]
        began = time.perf_counter()
        with ThreadPoolExecutor(in_flight()) as pool:
            list(pool.map(runner.run, messages))
        best = min(best, time.perf_counter() - began)
    return {"rows": rows, "chunk_rows": chunk_rows, "in_flight": in_flight(), "seconds": best, "rows_per_s": rows / best}


SERVE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from bench.feed import PacedModel
from vggish_pipeline.core.broker import make_app, poll_briefly
from vggish_pipeline.core.settings import Settings
from bench.feed import in_flight
from worker.chunk import ChunkRunner, serve
app = make_app(sys.argv[2], Settings()); poll_briefly(app)
runner = ChunkRunner(PacedModel(float(sys.argv[4]), Path(sys.argv[3]) / "times.txt"), [Path(sys.argv[3])], "bench@paced", "stand-in")
serve(app, runner, "bench@paced", "warning", in_flight())
"""


def overhead(work: Path, rows: int, chunk_rows: int, rate: float = GPU_RATE) -> dict:
    """A real worker process serving the paced stand-in; enqueue a job and time it to its last shard.

    The steady overhead per chunk is the time the model stood idle between chunks (after the first
    quarter, whose chunks also fault in each thread's fresh read buffer); the whole job's time also
    holds the first message's trip, the first read and the first shard's write."""
    from producer.local import LocalRedis
    from producer.plan import enqueue
    from vggish_pipeline.core.broker import make_app
    from vggish_pipeline.core.settings import Settings

    job = make_job(work / "overhead", rows, chunk_rows)
    (work / "times.txt").unlink(missing_ok=True)
    redis = LocalRedis().start()
    app = make_app(redis.url, Settings())
    log = open(work / "paced-worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-c", SERVE, str(ROOT), redis.url, str(work), str(rate)], stdout=log, stderr=subprocess.STDOUT)
    try:
        while not app.control.ping(timeout=0.2):
            if worker.poll() is not None:
                raise RuntimeError((work / "paced-worker.log").read_text())
        cpu_before = cpu_seconds(worker.pid)
        began = time.perf_counter()
        enqueue(app, job, job.chunks)
        shards = job.dir.shards
        while len(list(shards.glob("*.npz"))) < len(job.chunks):
            time.sleep(0.01)  # the steady figure comes from the shards themselves; polling must not steal a core
        seconds = time.perf_counter() - began
        cores = (cpu_seconds(worker.pid) - cpu_before) / seconds
    finally:
        worker.terminate()
        worker.wait()
        log.close()
        redis.stop()
    compute = rows / rate
    chunks = len(job.chunks)
    calls = sorted(tuple(map(float, line.split())) for line in (work / "times.txt").read_text().splitlines())
    steady = calls[chunks // 4 :]
    gaps = [b[0] - a[1] for a, b in zip(steady, steady[1:], strict=False)]
    idle = sum(gaps)
    busy = sum(end - start for start, end in steady[1:])
    return {
        "rows": rows, "chunk_rows": chunk_rows, "chunks": chunks, "rate": rate, "in_flight": in_flight(),
        "seconds": seconds, "compute_seconds": compute,
        "steady_overhead_ms_per_chunk": 1000 * idle / (len(steady) - 1), "steady_overhead_fraction": idle / busy,
        "steady_idle_ms_median": 1000 * sorted(gaps)[len(gaps) // 2],
        "whole_job_overhead_fraction": (seconds - compute) / compute, "worker_cores_busy": cores,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "feed.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vggish-feed-", dir=os.environ.get("TMPDIR")))
    try:
        r: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()}, "ceiling": [], "overhead": []}
        for chunk_rows in args.chunk_rows:
            r["ceiling"].append(ceiling(work, args.rows, chunk_rows))
            r["overhead"].append(overhead(work, args.rows, chunk_rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(r, indent=1))
    print(f"machine: {r['machine']}; the model is a STAND-IN (not VGGish)")
    for c in r["ceiling"]:
        print(f"feed ceiling, {c['chunk_rows']:>5}-row chunks, {c['in_flight']} in flight: {c['rows_per_s']:>9,.0f} rows/s")
    for o in r["overhead"]:
        print(f"at {o['rate']:,.0f} rows/s of compute, {o['chunk_rows']:>5}-row chunks, {o['in_flight']} in flight: "
              f"{o['steady_overhead_ms_per_chunk']:.1f} ms per chunk beyond compute (median {o['steady_idle_ms_median']:.1f} ms) "
              f"= {100 * o['steady_overhead_fraction']:.1f} % "
              f"(whole job: {o['seconds']:.2f} s for {o['compute_seconds']:.2f} s of compute, +{100 * o['whole_job_overhead_fraction']:.0f} %; "
              f"worker busy on {o['worker_cores_busy']:.2f} cores)")


if __name__ == "__main__":
    main()
