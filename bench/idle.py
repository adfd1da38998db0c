"""Benchmark: how long the model stands idle between chunks, and `producer run --workers 1` against the seed loop.

    python bench/idle.py [--rows 2560] [--chunk-rows 320] [--pairs 3] [--root CHECKOUT] [--out bench/idle.json]

The real model (VGGish, UNTRAINED weights) on the CPU, real `producer run` processes. Idle comes
from the worker's own log: each chunk's line says how long the model was idle before it (this
code), or, for code that does not say so (`--root` at an older commit), the time between two
chunks' log lines less the second chunk's own seconds (10 ms resolution). The first chunk is left
out: it waits for the worker's first message. Pairs run interleaved, seed loop then run, and the
ratio is taken pair by pair, so a drifting machine moves both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SEED_LOOP, timed  # noqa: E402

LINE = re.compile(r"^\[(\S+ \S+): INFO/MainProcess\] rows (\d+)-(\d+) embedded in ([\d.]+)s .*?(?:idle ([\d.]+) s before it)?$")


def idle_seconds(log: Path) -> list[float]:
    """Idle before each chunk but the first, from a worker's log."""
    rows = [m.groups() for line in log.read_text().splitlines() if (m := LINE.match(line))]
    if rows and rows[0][4] is not None:
        return [float(r[4]) for r in rows[1:]]
    stamps = [(datetime.strptime(r[0], "%Y-%m-%d %H:%M:%S,%f").timestamp(), float(r[3])) for r in rows]
    return [max(0.0, b - a - seconds) for (a, _), (b, seconds) in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2560)
    parser.add_argument("--chunk-rows", type=int, default=320)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code runs (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "idle.json")
    args = parser.parse_args()
    os.chdir(args.root)  # `python -m producer` and the seed loop's imports then take that checkout's code
    work = Path(tempfile.mkdtemp(prefix="vggish-idle-"))
    env = {"PYTHONPATH": str(args.root), "TF_CPP_MIN_LOG_LEVEL": "2", "VGGISH_CACHE_DIR": str(work / "cache")}
    run_env = {**os.environ, **env}
    py = sys.executable
    try:
        subprocess.run([py, "-m", "producer", "sample-data", str(work / "data"), "--rows", str(args.rows)], check=True, env=run_env,
                       capture_output=True, cwd=args.root)
        subprocess.run([py, "-m", "worker", "make-checkpoint", str(work / "model")], check=True, env=run_env, capture_output=True, cwd=args.root)
        spec, frame, ckpt = work / "data" / "wavfile_spec.dat", work / "data" / "wavfile_df.csv", work / "model" / "vggish_untrained.ckpt"

        def run(out: Path) -> float:
            cmd = [py, "-m", "producer", "run", str(spec), "--csv", str(frame), "--out", str(out), "--checkpoint", str(ckpt),
                   "--workers", "1", "--chunk-rows", str(args.chunk_rows)]
            return timed(cmd, env)[0]

        run(work / "warm")  # fills the cache (checkpoint digest, V2 copy), as on any machine after its first job
        pairs, idle = [], []
        for i in range(args.pairs):
            (work / f"seed{i}").mkdir()
            seed = timed([py, "-c", SEED_LOOP, str(spec), str(frame), str(ckpt), str(work / f"seed{i}")], env)[0]
            ours = run(work / f"run{i}")
            pairs.append({"seed_seconds": seed, "run_seconds": ours, "vs_seed": seed / ours})
            idle += idle_seconds(next((work / f"run{i}" / "logs").glob("*.log")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "root": str(args.root), "rows": args.rows, "chunk_rows": args.chunk_rows, "pairs": pairs,
        "vs_seed_median": statistics.median(p["vs_seed"] for p in pairs),
        "idle_ms_median": 1000 * statistics.median(idle), "idle_ms_max": 1000 * max(idle), "chunks_measured": len(idle),
    }
    args.out.write_text(json.dumps(result, indent=1))
    ratios = ", ".join(f"{p['vs_seed']:.3f}x" for p in pairs)
    print(f"{args.rows:,} rows in {args.chunk_rows}-row chunks, code at {args.root}: model idle between chunks "
          f"median {result['idle_ms_median']:.1f} ms (max {result['idle_ms_max']:.1f} ms, {len(idle)} chunks); "
          f"vs the seed loop, pair by pair: {ratios} (median {result['vs_seed_median']:.3f}x)")


if __name__ == "__main__":
    main()
