"""`producer watch` on a finished job that keeps growing: seconds from a 1 s recording landing in the
inbox to every output (.dat, _pca.dat, CSV) refreshed, at 105,835 and 1,000,000 rows, and for a
burst of 100 recordings.

The jobs are set up with the project's own shard writer and random embeddings over a sparse .dat
of zeros (`producer finalize` then writes their outputs): the measure is the refresh, not the
model. The new clips are embedded by a real local worker with an UNTRAINED checkpoint.

    python bench/watch.py [--rows 105835 1000000] [--landings 5] [--out bench/watch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vggish_pipeline.core.spectrogram import ROW_BYTES  # noqa: E402

SETTLE = 0.2  # --settle: how long a file must stay unchanged before it is read
POLL = 0.1  # --poll


def synthetic_job(where, pair: Path, rows: int, model: str):
    """A job of `rows` rows in `where` (a folder or a store's prefix) with every shard (random
    embeddings by `model`), over a pair in `pair`: a sparse .dat of zeros and its CSV."""
    from vggish_pipeline.core.job import Chunk, Job, JobDir
    from vggish_pipeline.core.shard import ShardMeta, write_shard
    from vggish_pipeline.core.spectrogram import NEW_DIGEST, digest

    pair.mkdir(parents=True, exist_ok=True)
    spec, frame = pair / "wavfile_spec.dat", pair / "wavfile_df.csv"
    with open(spec, "wb") as f:
        f.truncate(rows * ROW_BYTES)  # sparse zeros: valid spectrograms, no disk
    with open(frame, "w") as f:
        f.write(",file_name,label,valid\n")
        f.writelines(f"{i},old/c{i}.wav,yes,False\n" for i in range(rows))
    jobdir = JobDir(where)
    jobdir.ensure()
    jobdir.pin_model(model)
    zeros = {n: digest(np.zeros((n, 96, 64)), NEW_DIGEST) for n in {1024, rows % 1024 or 1024}}
    chunks = [Chunk(s, min(s + 1024, rows), zeros[min(1024, rows - s)]) for s in range(0, rows, 1024)]
    rng = np.random.default_rng(0)
    for c in chunks:
        emb = np.maximum(rng.standard_normal((c.rows, 128), dtype=np.float32), 0)
        write_shard(jobdir.shards, ShardMeta(c.start, c.stop, c.digest, "relu", model, "bench", 1.0), emb)
    job = Job("bench", str(where), str(spec), str(frame), rows, 1024, "relu", chunks, NEW_DIGEST)
    job.save()
    return job


def finished_job(directory: Path, rows: int, ckpt: Path, pca: Path, py: str, env: dict) -> None:
    """A job of `rows` rows whose shards (random embeddings) and outputs exist, as after a long run."""
    from vggish_pipeline.core.identity import fingerprint

    directory.mkdir(parents=True)
    synthetic_job(directory, directory, rows, fingerprint(ckpt, Path(env["VGGISH_CACHE_DIR"])))
    subprocess.run([py, "-m", "producer", "finalize", str(directory), "--pca-params", str(pca)], check=True, env=env, capture_output=True)


def workspace(prefix: str) -> tuple[Path, dict]:
    """A temp folder, and the environment the bench's commands run in (this checkout, its own cache)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    return work, {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "VGGISH_CACHE_DIR": str(work / "cache")}


def untrained_model(work: Path, env: dict) -> tuple[Path, Path]:
    """An UNTRAINED checkpoint (seeded random weights) and PCA params, written by the project."""
    subprocess.run([sys.executable, "-m", "worker", "make-checkpoint", str(work / "model")], check=True, env=env, capture_output=True)
    return work / "model" / "vggish_untrained.ckpt", work / "model" / "vggish_untrained_pca_params.npz"


def clip(path: Path, seed: int) -> Path:
    import soundfile

    rng = np.random.default_rng(seed)
    soundfile.write(path, 0.3 * np.sin(np.arange(16000) * 0.2) + 0.05 * rng.standard_normal(16000), 16000, subtype="PCM_16")
    return path


def measure(work: Path, rows: int, landings: int, ckpt: Path, pca: Path, py: str, env: dict) -> dict:
    directory = work / f"job{rows}"
    began = time.perf_counter()
    finished_job(directory, rows, ckpt, pca, py, env)
    setup = time.perf_counter() - began
    inbox, staging = directory / "inbox", directory / "staging"
    inbox.mkdir()
    staging.mkdir()
    log = directory / "watch.log"
    cmd = [
        py, "-m", "producer", "watch", str(inbox), "--label", "new", "--spec", str(directory / "wavfile_spec.dat"),
        "--checkpoint", str(ckpt), "--pca-params", str(pca), "--settle", str(SETTLE), "--poll", str(POLL),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"})

    def refreshes() -> list[str]:
        return [x for x in log.read_text().splitlines() if x.startswith("outputs refreshed")]

    def until(total_rows: int) -> None:
        while not any(line.startswith(f"outputs refreshed: {total_rows} rows") for line in refreshes()):
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.005)

    singles, burst = [], {}
    try:
        until(rows)  # the first pass reads every chunk once (new watch); not timed
        total = rows
        for i in range(landings):
            ready = clip(staging / f"one{i}.wav", i)
            landed = time.perf_counter()
            os.replace(ready, inbox / ready.name)
            total += 1
            until(total)
            singles.append(time.perf_counter() - landed)
        files = [clip(staging / f"burst{i:03d}.wav", 1000 + i) for i in range(100)]
        landed = time.perf_counter()
        for f in files:
            os.replace(f, inbox / f.name)
        total += 100
        until(total)
        burst_seconds = time.perf_counter() - landed
        new_shards = sorted(directory.glob("shards/*.npz"), key=lambda p: p.stat().st_mtime)
        from vggish_pipeline.core.shard import read_meta

        compute = sum(read_meta(p).seconds for p in new_shards if read_meta(p).start >= rows + landings)
        burst = {"seconds": burst_seconds, "compute_seconds": compute, "beyond_compute": burst_seconds - compute}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    dat = np.fromfile(directory / "wavfile_embed.dat").reshape(-1, 128)
    assert len(dat) == total and (directory / "wavfile_embed_pca.dat").stat().st_size == total * 128
    return {
        "rows": rows, "setup_seconds": setup, "settle": SETTLE, "poll": POLL, "single_clip_seconds": singles,
        "single_clip_median": statistics.median(singles), "burst_100": burst, "refreshes": refreshes()[1:4],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[105_835, 1_000_000])
    parser.add_argument("--landings", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "watch.json")
    args = parser.parse_args()
    py = sys.executable
    work, env = workspace("vggish-watch-")
    try:
        ckpt, pca = untrained_model(work, env)
        results = [measure(work, rows, args.landings, ckpt, pca, py, env) for rows in args.rows]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1))
    for r in results:
        singles = ", ".join(f"{s:.2f}" for s in r["single_clip_seconds"])
        b = r["burst_100"]
        print(
            f"{r['rows']:>9,} rows: 1 s clip landed -> all outputs refreshed: median {r['single_clip_median']:.2f} s ({singles}); "
            f"burst of 100: {b['seconds']:.2f} s, of which compute {b['compute_seconds']:.2f} s ({b['beyond_compute']:.2f} s beyond)"
        )


if __name__ == "__main__":
    main()
