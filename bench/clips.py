"""`producer add-clips` on a corpus in the Speech Commands layout, against a plain loop of the same
recipe over the same files: files/s, and the peak memory of the whole process tree.

The corpus: FILES one-second 16 kHz PCM-16 recordings (Speech Commands' format) of tone-and-noise
"words" in 10 label folders, one in 50 of them 0.6 s (padded), and a validation_list.txt. The
plain loop is what a notebook does with upstream's recipe: for each file soundfile, resampy
(when the rate is not 16 kHz), the log-mel, the first example; then one .dat and one CSV.
`add-clips --rows-per-file 1 --valid-list` makes the same rows, on one core (--jobs 1) and on
every core this process may use. The plain loop runs twice: as a notebook runs it (OpenBLAS
starts a thread per core, which spin against each other on the log-mel's small matrix product),
and with OPENBLAS_NUM_THREADS=1, as add-clips runs each process.

    python bench/clips.py [--files 2000 20000] [--out bench/clips.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LABELS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def make_corpus(root: Path, files: int) -> None:
    import soundfile

    rng = np.random.default_rng(0)
    listed = []
    for i in range(files):
        label = LABELS[i % len(LABELS)]
        seconds = 0.6 if i % 50 == 0 else 1.0
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.4 * np.sin(2 * np.pi * (200 + 7 * (i % 300)) * t) + 0.05 * rng.standard_normal(len(t))
        path = root / label / f"{i:08x}_nohash_0.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, wave, 16000, subtype="PCM_16")
        if i % 10 == 3:
            listed.append(f"{label}/{path.name}")
    (root / "validation_list.txt").write_text("\n".join(listed) + "\n")


PLAIN_LOOP = r"""
import sys, numpy as np, pandas as pd, soundfile
from pathlib import Path
from producer.audio import MIN_SAMPLES, examples, resample
root, out = Path(sys.argv[1]), Path(sys.argv[2])
valid = set((root / "validation_list.txt").read_text().split())
rows, frame = [], []
for path in sorted(p for p in root.rglob("*.wav")):
    data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    mono = resample((data / 32768.0).mean(axis=1), rate)
    if len(mono) < MIN_SAMPLES:
        mono = np.concatenate([mono, np.zeros(MIN_SAMPLES - len(mono))])
    rows.append(examples(mono)[0])
    name = path.relative_to(root).as_posix()
    frame.append((str(path), path.parent.name, name in valid))
np.asarray(rows, dtype="<f8").tofile(out / "wavfile_spec.dat")
pd.DataFrame(frame, columns=["file_name", "label", "valid"]).to_csv(out / "wavfile_df.csv")
"""


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        children.setdefault(int(fields["PPid"]), []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def timed(args: list[str], env: dict) -> tuple[float, int]:
    """Seconds, and the peak resident bytes of the process tree (sampled every 50 ms)."""
    began = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.monotonic() - began
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{args[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "clips.json")
    args = parser.parse_args()
    from vggish_pipeline.core.devices import usable_cores

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    results = {"cores": usable_cores(), "runs": []}
    for files in args.files:
        with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
            root = Path(tmp) / "corpus"
            make_corpus(root, files)
            run = {"files": files}
            runs = [("plain_loop", None), ("plain_loop_1_blas_thread", None), ("add_clips_1_core", 1), ("add_clips_all_cores", usable_cores())]
            for name, jobs in runs:
                out = Path(tmp) / name
                out.mkdir()
                if jobs is None:
                    command = [py, "-c", PLAIN_LOOP, str(root), str(out)]
                    if "1_blas" in name:
                        command = ["env", "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", *command]
                else:
                    command = [py, "-m", "producer", "add-clips", str(root), "--label-from-folder", "--rows-per-file", "1",
                               "--valid-list", str(root / "validation_list.txt"), "--jobs", str(jobs), "--spec", str(out / "wavfile_spec.dat")]
                seconds, peak = timed(command, env)
                run[name] = {"seconds": round(seconds, 2), "files_per_s": round(files / seconds, 1), "peak_rss_mb": round(peak / 2**20)}
                print(files, name, run[name], flush=True)
            specs = {(Path(tmp) / n / "wavfile_spec.dat").read_bytes() for n, _ in runs}
            run["same_rows"] = len(specs) == 1
            for base in ("plain_loop", "plain_loop_1_blas_thread"):
                run[f"speedup_vs_{base}"] = round(run["add_clips_all_cores"]["files_per_s"] / run[base]["files_per_s"], 2)
            results["runs"].append(run)
            shutil.rmtree(root)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
