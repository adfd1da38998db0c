"""`worker doctor`: what a new GPU machine will do with a job, checked before the job.

Each device is probed by a child process pinned to it exactly as a worker is (its UUID in
CUDA_VISIBLE_DEVICES, the runtime environment set before TensorFlow loads): what TensorFlow sees
there, and one small embedding, compared with the same rows on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vggish_pipeline.core.devices import Device, discover, memory_policy, runtime_env
from vggish_pipeline.core.settings import CPU_FALLBACK_ENV, Settings

PROBE_ROWS = 16
TOLERANCE = 1e-4  # relative, float32 across devices (README, "Precision")


def probe(checkpoint: Path, cache_dir: Path) -> dict:
    """In a pinned child: what TensorFlow sees here, and the embedding of PROBE_ROWS seeded rows."""
    from worker.model import Embedder
    from worker.runtime import no_gpu_reason, tensorflow_gpus

    tf, gpus, said = tensorflow_gpus()
    model = Embedder(checkpoint, cache_dir)
    rows = np.random.default_rng(0).standard_normal((PROBE_ROWS, 96, 64))
    return {
        "device": model.device,
        "gpus": len(gpus),
        "reason": None if gpus else no_gpu_reason(tf, said),
        "embedding": model.embed(rows, "linear").tolist(),
    }


def run_probe(env: dict[str, str], checkpoint: Path, cache_dir: Path, timeout: float = 3600) -> dict:
    """`probe` in a child process with `env` laid over this one's; {"error": …} if it fails."""
    code = ("import json, sys; from pathlib import Path; from worker.doctor import probe; "
            "print(json.dumps(probe(Path(sys.argv[1]), Path(sys.argv[2]))))")
    full = {**os.environ, **env, **runtime_env(cache_dir, {**os.environ, **env})}
    try:
        done = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(cache_dir)], capture_output=True, text=True,
                              env=full, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {timeout:.0f} s"}
    if done.returncode:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": f"exit {done.returncode}: {last[-1] if last else ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def agree(a: list, b: list) -> float:
    """The largest difference between two embeddings, relative to the largest value."""
    x, y = np.asarray(a), np.asarray(b)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))


def examine(settings: Settings, checkpoint: Path | None, say: Callable[[str], None]) -> int:
    """Say, line by line, what nvidia-smi lists, what this process is granted, the memory policy and
    the CUDA cache, and what TensorFlow does behind each device; 0 if a job would run as intended."""
    problems = 0
    made = None
    if checkpoint is None:
        from worker import checkpoint as ckpt

        made = Path(tempfile.mkdtemp(prefix="vggish-doctor-"))
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # its V1-format notices are not this command's to say
        checkpoint = ckpt.write_untrained_checkpoint(made / ckpt.UNTRAINED_CHECKPOINT, seed=0)
        say(f"checkpoint: none given; probing with an UNTRAINED one ({checkpoint})")
    else:
        say(f"checkpoint: {checkpoint}")
    try:
        discovery = discover(settings.nvidia_smi_timeout)
        for note in discovery.notes:
            say(f"nvidia-smi: {note}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        say(f"granted: CUDA_VISIBLE_DEVICES={visible if visible is not None else '<unset: every device>'}; "
            f"{len(discovery.devices)} device(s): " + (", ".join(f"{d.index} {d.name} ({d.uuid})" for d in discovery.devices) or "none"))
        say(memory_line(settings))
        cpu = run_probe({"CUDA_VISIBLE_DEVICES": "-1"}, checkpoint, settings.cache_dir)
        if "error" in cpu:
            say(f"CPU: FAILED: {cpu['error']}")
            return 3
        say(f"CPU: embeds ({PROBE_ROWS} rows)")
        if discovery.unanswered:
            problems += 1
        if not discovery.devices:
            say("no GPU: workers compute on the CPU" + (" (nvidia-smi did not answer: see above)" if discovery.unanswered else ""))
        for device in discovery.devices:
            problems += not check_device(device, cpu, checkpoint, settings, say)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    say("all checks passed" if not problems else f"{problems} problem(s): see above")
    return 3 if problems else 0


def check_device(device: Device, cpu: dict, checkpoint: Path, settings: Settings, say: Callable[[str], None]) -> bool:
    """One device's line: whether TensorFlow sees it and embeds as the CPU does."""
    got = run_probe(device.env(), checkpoint, settings.cache_dir)
    where = device.describe()
    if "error" in got:
        say(f"{where}: FAILED: {got['error']}")
        return False
    if not got["gpus"]:
        if settings.allow_cpu_fallback:
            say(f"{where}: TensorFlow sees no GPU ({got['reason']}); workers would compute on the CPU, as {CPU_FALLBACK_ENV}=1 allows")
            return True
        say(f"{where}: FAILED: TensorFlow sees no GPU there: {got['reason']}; a worker pinned to it stops at start")
        return False
    off = agree(got["embedding"], cpu["embedding"])
    ok = off <= TOLERANCE
    say(f"{where}: TensorFlow runs on {got['device']}; its embedding is {off:.1e} off the CPU's (relative) "
        + ("OK" if ok else f"FAILED: more than {TOLERANCE:g}"))
    return ok


def memory_line(settings: Settings) -> str:
    """What workers started here would get: memory growth, limit, CUDA's JIT cache and the disk under it."""
    env = {**os.environ, **runtime_env(settings.cache_dir, os.environ)}
    cache = Path(env.get("CUDA_CACHE_PATH", "~/.nv/ComputeCache")).expanduser()
    existing = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
    return f"memory: {memory_policy(env, settings.gpu_memory_limit)}, {shutil.disk_usage(existing).free >> 20:,} MiB free there"
