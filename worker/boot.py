"""Booting one worker: pin it to its device, set the runtime's environment, load the model while
Celery connects, and serve chunks until a warm stop. `worker start` parses; this does."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import PipelineError, StoreError, UsageError
from vggish_pipeline.core.identity import local_checkpoint
from vggish_pipeline.core.settings import CHECKPOINT_ENV, CPU_FALLBACK_ENV, Settings
from vggish_pipeline.core.store import Location

if TYPE_CHECKING:
    from vggish_pipeline.core.devices import Device
    from worker.model import Embedder

log = logging.getLogger("worker")


@dataclass(frozen=True)
class StartOptions:
    """What `worker start` is asked for beyond the settings: the device, threads, batches, chunks held."""

    gpu: str | None = None  # an index, INDEX:SLICE or UUID; None: as the environment pins it
    cpu: bool = False  # hide every GPU
    threads: int = 0  # 0: every core on the CPU, 2 on a GPU
    batch_size: int = 0
    chunks_in_flight: int | None = None
    loglevel: str = "info"

    def check(self) -> None:
        if self.chunks_in_flight is not None and self.chunks_in_flight < 1:
            raise UsageError("--chunks-in-flight must be at least 1")


def data_roots(settings: Settings) -> list[Location]:
    """The folders and bucket prefixes this worker may read and write, each checked at start: a
    folder it can see; a prefix whose bucket answers (a missing bucket, wrong credentials or an
    unreachable store is one line), written to if it may be (else it is named read-only: inputs)."""
    roots = list(settings.data_roots) or [Path.cwd()]
    for root in roots:
        if store.remote(root):
            store.check_bucket(root)
            try:
                once = store.check_writable(root)
            except StoreError as e:
                if not isinstance(e.__cause__, PermissionError):
                    raise
                log.warning("%s: read-only for this worker (%s): it reads inputs there, and a job folder there fails its chunks", root, e)
                continue
            if not once:
                log.warning("%s: the store ignores conditional writes (If-None-Match): a chunk two workers race for may have "
                            "its shard written twice, the last copy kept, and model.json too is the last writer's", root)
        elif not root.is_dir():
            raise PipelineError(f"data root {root} is not a folder this worker can see (shared storage mounted?)")
    return roots


def pin(options: StartOptions, settings: Settings) -> tuple[Device | None, str]:
    """Pin this process (GPU, CPUs) and set the runtime's environment, before TensorFlow loads:
    the device pinned to, if any, and the worker's name."""
    from vggish_pipeline.core.devices import cpu_list, pin_process, runtime_env

    device = pin_process(options.gpu, settings.nvidia_smi_timeout) if options.gpu is not None else None
    if options.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    os.environ.update(runtime_env(settings.cache_dir, os.environ))  # before TensorFlow and CUDA read them
    host = socket.gethostname()
    default = f"{device.short}@{host}" if device else f"{'cpu' if options.cpu else 'worker'}{os.getpid()}@{host}"
    name = settings.worker_name or default
    log.info(
        "%s: pinned to %s, CUDA_VISIBLE_DEVICES=%s, CPUs %s",
        name,
        device.describe() if device else "no GPU",
        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        cpu_list(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "all",
    )
    return device, name


def load_model(checkpoint: Path, device: Device | None, options: StartOptions, settings: Settings) -> Embedder:
    """The warm model; its weights load on a helper thread (~0.8 s without the GIL) while Celery
    loads, connects and starts, which is then held at worker_init until they are in."""
    from worker.model import Embedder  # TensorFlow loads only now, after CUDA_VISIBLE_DEVICES is set

    model = Embedder(
        checkpoint, settings.cache_dir, options.threads, options.batch_size, tf32=settings.tf32,
        gpu_memory_limit=settings.gpu_memory_limit,
        require_gpu=device.describe() if device is not None and not settings.allow_cpu_fallback else None,
    )
    if device is not None and not model.on_gpu:
        log.warning("pinned to %s, but TensorFlow sees no GPU there (%s): computing on the CPU, as %s=1 allows",
                    device.describe(), model.no_gpu_reason, CPU_FALLBACK_ENV)
    return model


def start(options: StartOptions, settings: Settings) -> NoReturn:
    """Boot one worker and serve until a warm stop; leaves the process with the worker's exit code."""
    from vggish_pipeline.core import broker
    from vggish_pipeline.core.devices import memory_policy

    url = broker.broker_url(settings)
    if settings.checkpoint is None:
        raise UsageError(f"no checkpoint: pass --checkpoint or set {CHECKPOINT_ENV}")
    options.check()
    if settings.gpu_memory_limit is not None and settings.gpu_memory_limit < 1:
        raise UsageError("--gpu-memory-limit must be at least 1 MiB")
    if settings.exit_when_idle is not None and not settings.exit_when_idle > 0:
        raise UsageError(f"--exit-when-idle must be a number of seconds above 0, not {settings.exit_when_idle:g}")
    roots = data_roots(settings)
    device, name = pin(options, settings)
    loading = time.perf_counter()
    model = load_model(local_checkpoint(settings.checkpoint, settings.cache_dir), device, options, settings)
    from worker.chunk import GPU_IN_FLIGHT, ChunkRunner, serve

    app = broker.make_app(url, settings)
    broker.check_connection(app)
    broker.poll_briefly(app)
    log.info(
        "%s: TensorFlow device %s, %s threads, batches of %d rows, checkpoint %s (model %s), data roots %s",
        name, model.device, model.threads or "all cores'", model.batch_size, settings.checkpoint, model.fingerprint,
        ", ".join(map(str, roots)),
    )
    log.info("%s: GPU memory: %s%s", name, memory_policy(os.environ, model.memory_limit), "" if model.on_gpu else "; computing on the CPU")
    if model.untrained:
        log.warning("checkpoint %s holds UNTRAINED seeded random weights: its embeddings mean nothing", settings.checkpoint)
    metrics = None
    if settings.metrics_port is not None:
        from vggish_pipeline.core.metrics import WorkerMetrics, serve_metrics

        metrics = WorkerMetrics(name, model.device, model.fingerprint)
        serve_metrics(metrics.registry, settings.metrics_port)
        log.info("%s: metrics at http://0.0.0.0:%d/metrics", name, settings.metrics_port)
    runner = ChunkRunner(model, roots, name, device.describe() if device else None, metrics=metrics)
    in_flight = options.chunks_in_flight or (GPU_IN_FLIGHT if model.device.startswith("GPU") else 1)

    def loaded() -> None:
        await_weights(model)
        if metrics is not None:
            metrics.load.set(time.perf_counter() - loading)

    code = serve(app, runner, name, options.loglevel, in_flight, before_start=loaded, exit_when_idle=settings.exit_when_idle)
    # Celery has acked the last chunk and every shard is fsynced. Tearing down TensorFlow at
    # interpreter exit would take another ~0.8 s per worker (measured) for nothing, so leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def await_weights(model: Embedder) -> None:
    """Hold Celery before it connects (no ping answered, no chunk taken) until the weights are in,
    so "ready" still means a checked, loaded model; leave with the one-line error if not."""
    try:
        model.loaded()
    except PipelineError as e:
        print(error_line(e), file=sys.__stderr__, flush=True)  # Celery has taken over sys.stderr
        os._exit(e.exit_code)  # nothing is connected yet


def error_line(e: PipelineError) -> str:
    return f"worker: error: {e}"
