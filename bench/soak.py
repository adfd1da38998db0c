"""A watch left running: a 1 s clip lands every INTERVAL seconds for DURATION seconds on a finished
105,835-row job; its shard count, memory (the whole process tree: watch, private Redis, worker) and
each clip's latency (landed -> in the outputs' manifest, so in every output) over time.

The job is set up as in bench/watch.py (the project's shard writer, random embeddings, a sparse
.dat); the new clips are embedded by a real local worker with an UNTRAINED checkpoint. The watch
runs with its defaults (--compact-after 32) but --settle 0.2 --poll 0.1.

    python bench/soak.py [--duration 600] [--interval 0.5] [--out bench/soak.json]
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from clips import tree_rss  # noqa: E402
from watch import POLL, SETTLE, clip, finished_job, untrained_model, workspace  # noqa: E402

ROWS = 105_835


def manifest_rows(directory: Path) -> int:
    try:
        return json.loads((directory / "wavfile_embed.manifest.json").read_bytes())["rows"]
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "soak.json")
    args = parser.parse_args()
    py = sys.executable
    work, env = workspace("vggish-soak-")
    try:
        ckpt, pca = untrained_model(work, env)
        directory = work / "job"
        finished_job(directory, ROWS, ckpt, pca, py, env)
        inbox, staging = directory / "inbox", directory / "staging"
        inbox.mkdir()
        staging.mkdir()
        log = directory / "watch.log"
        cmd = [py, "-m", "producer", "watch", str(inbox), "--label", "new", "--spec", str(directory / "wavfile_spec.dat"),
               "--checkpoint", str(ckpt), "--pca-params", str(pca), "--settle", str(SETTLE), "--poll", str(POLL)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"})
        while "outputs refreshed" not in log.read_text():
            if proc.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.05)
        seen: dict[int, float] = {}  # outputs' rows -> when first seen
        stop = threading.Event()

        def watch_manifest() -> None:
            while not stop.is_set():
                rows = manifest_rows(directory)
                seen.setdefault(rows, time.monotonic())
                time.sleep(0.01)

        threading.Thread(target=watch_manifest, daemon=True).start()
        landed: list[float] = []
        samples = []
        began = time.monotonic()
        next_sample = began
        try:
            while time.monotonic() - began < args.duration:
                ready = clip(staging / f"c{len(landed):06d}.wav", len(landed))
                os.replace(ready, inbox / ready.name)
                landed.append(time.monotonic())
                if time.monotonic() >= next_sample:
                    job = json.loads((directory / "job.json").read_text())
                    samples.append({
                        "seconds": round(time.monotonic() - began, 1), "clips": len(landed), "outputs_rows": manifest_rows(directory),
                        "shards": len(list((directory / "shards").glob("*.npz"))),
                        "small_chunks": sum(b - a < job["chunk_rows"] for a, b, _ in job["chunks"]),
                        "rss_mib": round(tree_rss(proc.pid) / 2**20),
                    })
                    print(samples[-1], flush=True)
                    next_sample += 30
                time.sleep(max(0.0, began + len(landed) * args.interval - time.monotonic()))
            deadline = time.monotonic() + 120
            while manifest_rows(directory) < ROWS + len(landed) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        times = sorted(seen.items())
        latencies = []
        for i, t in enumerate(landed):  # the i-th clip is in once the outputs hold ROWS + i + 1 rows (first landed, first in)
            first = next((when for rows, when in times if rows >= ROWS + i + 1), None)
            latencies.append(None if first is None else round(first - t, 3))
        done = [x for x in latencies if x is not None]
        per_minute = []
        for m in range(int(args.duration // 60) + 1):
            window = [x for t, x in zip(landed, latencies, strict=True) if x is not None and m * 60 <= t - began < (m + 1) * 60]
            if window:
                per_minute.append({"minute": m, "clips": len(window), "median_s": round(statistics.median(window), 2), "max_s": round(max(window), 2)})
        text = log.read_text()
        result = {
            "rows": ROWS, "duration_s": args.duration, "interval_s": args.interval, "clips": len(landed), "clips_in_outputs": len(done),
            "latency_median_s": round(statistics.median(done), 2), "latency_p95_s": round(sorted(done)[int(0.95 * (len(done) - 1))], 2),
            "refreshes": text.count("outputs refreshed"), "compactions": text.count("compacted:"),
            "errors": [line for line in text.splitlines() if "error" in line.lower()][:5],
            "per_minute": per_minute, "samples": samples,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
