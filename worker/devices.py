"""Which devices a machine has, found without importing TensorFlow (which must not see them yet)."""

from __future__ import annotations

import os
import shutil
import subprocess


def gpu_ids() -> list[int]:
    """The GPUs `nvidia-smi -L` lists; none when it is absent or fails."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [i for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def threads_per_worker(workers: int) -> int:
    """Split the cores this process may use evenly, so N CPU workers do not fight over them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(workers, 1))


def load_tensorflow():
    """Import TensorFlow without the C++ start-up chatter it writes straight to fd 2.

    Import after CUDA_VISIBLE_DEVICES is final: TensorFlow reads it once, here.
    """
    import sys

    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
        tensorflow.constant(0)  # device discovery logs at first use: keep it quiet too
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow
