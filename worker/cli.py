"""`worker`: start a Celery worker with a warm VGGish session, or write an untrained checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vggish_pipeline.core import package_version
from vggish_pipeline.core.errors import EXIT_CODES, PipelineError, UsageError, as_pipeline_error
from vggish_pipeline.core.settings import (
    AUTOSCALE_ENV,
    BROKER_ENV,
    CHECKPOINT_ENV,
    CPU_FALLBACK_ENV,
    DATA_ROOTS_ENV,
    EXIT_WHEN_IDLE_ENV,
    GPU_MEMORY_ENV,
    METRICS_ENV,
    NAME_ENV,
    SCALE_IDLE_DEFAULT,
    SCALE_IDLE_ENV,
    Settings,
    add_tls_flags,
    location_arg,
    variables_help,
)
from worker.model import DEFAULT_BATCH

if TYPE_CHECKING:
    from celery import Celery

    from vggish_pipeline.core.fleet import Fleet



log = logging.getLogger("worker")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="worker", description=__doc__,
        epilog=EXIT_CODES + "\n" + variables_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_start(sub)
    add_up(sub)
    add_others(sub)
    return parser.parse_args(argv)


def add_start(sub) -> None:
    start = sub.add_parser("start", help="run one worker process on one device")
    start.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL)")
    add_tls_flags(start)
    start.add_argument("--checkpoint", type=location_arg, help=f"VGGish checkpoint (env {CHECKPOINT_ENV})")
    device = start.add_mutually_exclusive_group()
    device.add_argument(
        "--gpu",
        metavar="INDEX|UUID",
        help="pin to this GPU or MIG slice (nvidia-smi's index, e.g. 2 or 2:1, or its UUID) and the CPUs near it",
    )
    device.add_argument("--cpu", action="store_true", help="hide every GPU (CUDA_VISIBLE_DEVICES=-1)")
    start.add_argument(
        "--name", help=f"worker name, e.g. gpu0@host (env {NAME_ENV}; default: from the device and host)"
    )
    start.add_argument("--threads", type=int, default=0, help="TensorFlow threads per pool (0: every core on the CPU, 2 on a GPU)")
    start.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"rows per session.run (default {DEFAULT_BATCH})")
    start.add_argument(
        "--data-root",
        type=location_arg,
        action="append",
        help=f"folder the worker may read and write under; repeatable (env {DATA_ROOTS_ENV}, "
        "separated by ':'; default: the current folder)",
    )
    start.add_argument(
        "--tf32",
        action="store_true",
        help="let TensorFlow compute in TF32 on Ampere and newer GPUs: faster, ~1e-3 off float32 (env VGGISH_TF32=1)",
    )
    start.add_argument(
        "--chunks-in-flight",
        type=int,
        metavar="N",
        help="chunks held at a time: one in the model while the next is read and the last written "
        "(default 3 on a GPU, 1 on the CPU, where the model is the bottleneck; a warm stop finishes them all)",
    )
    add_gpu_flags(start)
    start.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                       help=f"leave (exit 0) once no chunk came for SECONDS: for Slurm job arrays and Kubernetes Jobs "
                            f"(env {EXIT_WHEN_IDLE_ENV}; default: stay)")
    start.add_argument("--metrics-port", type=int, metavar="PORT", help=f"serve Prometheus metrics at :PORT/metrics (env {METRICS_ENV})")
    start.add_argument("--loglevel", default="info", help="Celery log level (default info)")


def add_up(sub) -> None:
    up = sub.add_parser("up", help="start one worker per GPU (or N CPU workers) in the foreground")
    which = up.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--gpus", help="'all' (every GPU or MIG slice this process is granted), or indices or UUIDs, e.g. 0,1 or GPU-8932f937"
    )
    which.add_argument("--cpus", type=int, metavar="N", help="N CPU workers splitting this machine's cores")
    up.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL)")
    add_tls_flags(up)
    up.add_argument("--checkpoint", type=location_arg, help=f"VGGish checkpoint (env {CHECKPOINT_ENV})")
    up.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="as for `worker start`")
    up.add_argument("--tf32", action="store_true", help="as for `worker start`")
    up.add_argument("--data-root", type=location_arg, action="append", help="as for `worker start`")
    up.add_argument("--autoscale", metavar="MIN:MAX",
                    help=f"start workers on these devices as the broker's backlog asks, at most MAX, and let idle ones go, "
                         f"keeping MIN (0: none while nothing is queued) (env {AUTOSCALE_ENV})")
    up.add_argument("--scale-idle", type=float, metavar="SECONDS",
                    help=f"with --autoscale: seconds an extra worker goes without a chunk before it leaves (env {SCALE_IDLE_ENV}; "
                         f"default {SCALE_IDLE_DEFAULT:g})")
    up.add_argument("--metrics-port", type=int, metavar="PORT",
                    help=f"serve each worker's Prometheus metrics, on PORT, PORT+1… in the order started (env {METRICS_ENV})")
    add_gpu_flags(up)


def add_others(sub) -> None:
    down = sub.add_parser("down", help="ask a worker to finish its current chunk and leave")
    down.add_argument("name", help="worker name, e.g. gpu3@host")
    down.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL)")
    add_tls_flags(down)

    ping = sub.add_parser("ping", help="exit 0 if the worker answers through the broker (a container healthcheck)")
    ping.add_argument("name", nargs="?", help=f"worker name (env {NAME_ENV})")
    ping.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL)")
    add_tls_flags(ping)

    doctor = sub.add_parser(
        "doctor", help="check this machine's GPUs before a job: what nvidia-smi lists, what TensorFlow sees, one embedding each"
    )
    doctor.add_argument(
        "--checkpoint", type=Path, help=f"VGGish checkpoint to probe with (env {CHECKPOINT_ENV}; default: an UNTRAINED one)"
    )
    add_gpu_flags(doctor)

    make = sub.add_parser("make-checkpoint", help="write an UNTRAINED checkpoint and PCA params for tests and demos")
    make.add_argument("out_dir", type=Path, help="folder for the UNTRAINED checkpoint and PCA params")
    make.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    make.add_argument("--v2", action="store_true", help="write the V2 format instead of the official V1")


def add_gpu_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu-memory-limit", type=int, metavar="MIB",
        help=f"GPU memory a worker may take, in MiB (env {GPU_MEMORY_ENV}; default: grown as needed)",
    )
    parser.add_argument(
        "--allow-cpu-fallback", action="store_true",
        help=f"compute on the CPU (~100x slower) when TensorFlow cannot see the GPU a worker is pinned to (env {CPU_FALLBACK_ENV}=1)",
    )


def start(args: argparse.Namespace, settings: Settings) -> int:
    from worker.boot import StartOptions
    from worker.boot import start as boot

    boot(StartOptions(args.gpu, args.cpu, args.threads, args.batch_size, args.chunks_in_flight, args.loglevel), settings)


def up(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import time

    from vggish_pipeline.core import broker
    from vggish_pipeline.core.devices import discover, select
    from vggish_pipeline.core.fleet import Fleet

    if args.gpus is not None:
        discovery = discover(settings.nvidia_smi_timeout)
        gpus = select(args.gpus, discovery)
        for note in discovery.notes:
            log.warning("%s", note)
    elif args.cpus < 1:
        raise UsageError("--cpus must be at least 1")
    else:
        gpus = []
    broker.broker_url(settings)  # fails now, in one line, if none is given
    # The URL reaches the workers by environment, as given (a password file stays a file): a command line shows it to `ps`.
    env = {BROKER_ENV: str(settings.broker_url), **settings.tls_env()}
    common = ["--batch-size", str(args.batch_size), *(["--tf32"] if args.tf32 else [])]
    common += ["--allow-cpu-fallback"] if args.allow_cpu_fallback else []
    common += ["--gpu-memory-limit", str(args.gpu_memory_limit)] if args.gpu_memory_limit else []
    if args.checkpoint:
        common += ["--checkpoint", str(args.checkpoint)]
    for root in args.data_root or []:
        common += ["--data-root", str(root)]
    fleet = Fleet.plan(gpus, args.cpus or 0, common, env, metrics_port=settings.metrics_port)
    if settings.autoscale:
        return autoscale(fleet, settings)
    signal.signal(signal.SIGTERM, lambda *_: fleet.signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: fleet.signal(signal.SIGTERM))
    fleet.start()
    log.info("started %s", ", ".join(f"{m.name} (pid {m.describe()['pid']}, {m.where()})" for m in fleet.members))
    while len(fleet.dead()) < len(fleet.members):
        fleet.report_deaths()
        time.sleep(0.5)
    fleet.report_deaths()
    return 1 if any(m.exit_code() for m in fleet.members) else 0


def autoscale(fleet: Fleet, settings: Settings) -> int:
    """`worker up --autoscale`: follow the backlog (worker.autoscale) until SIGTERM or Ctrl-C, then warm-stop every worker."""
    import signal
    import threading

    from vggish_pipeline.core import broker
    from vggish_pipeline.core.autoscale import Autoscaler, scale_range

    if not settings.scale_idle > 0:
        raise UsageError("--scale-idle must be a number of seconds above 0")
    low, high = scale_range(settings.autoscale or "", len(fleet.members))
    app = broker.make_app(broker.broker_url(settings), settings)
    broker.check_connection(app)
    scaler = Autoscaler(fleet, app, low, high, settings.scale_idle)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("autoscale: %d to %d workers on %s; extra ones leave after %g s idle", low, high,
             ", ".join(m.where() for m in fleet.members), settings.scale_idle)
    try:
        while not stop.is_set():
            scaler.step()
            stop.wait(1.0)
    finally:
        fleet.stop()
    return 0


def ping(args: argparse.Namespace, settings: Settings) -> Celery:
    """The broker's app, once the worker named (or VGGISH_WORKER_NAME) has answered its ping."""
    from vggish_pipeline.core import broker

    if not settings.worker_name:
        raise UsageError(f"name a worker, or set {NAME_ENV}")
    app = broker.make_app(broker.broker_url(settings), settings)
    broker.check_connection(app)
    if not app.control.ping(destination=[settings.worker_name], timeout=2.0):
        raise PipelineError(f"no live worker named {settings.worker_name}")
    return app


def down(args: argparse.Namespace, settings: Settings) -> int:
    ping(args, settings).control.shutdown(destination=[settings.worker_name])
    print(f"asked {settings.worker_name} to finish its current chunk and stop")
    return 0


def doctor(args: argparse.Namespace, settings: Settings) -> int:
    from vggish_pipeline.core.identity import local_checkpoint
    from worker.doctor import examine

    checkpoint = local_checkpoint(settings.checkpoint, settings.cache_dir) if settings.checkpoint else None
    return examine(settings, checkpoint, lambda line: print(line, flush=True))


def make_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from worker import checkpoint

    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.write_untrained_checkpoint(args.out_dir / checkpoint.UNTRAINED_CHECKPOINT, args.seed, not args.v2)
    pca = checkpoint.write_untrained_pca(args.out_dir / checkpoint.UNTRAINED_PCA, args.seed)
    (args.out_dir / "UNTRAINED.txt").write_text(
        f"{ckpt.name} and {pca.name} hold seeded random weights (seed {args.seed}), NOT the trained VGGish.\n"
        "They exist to test the pipeline; embeddings made with them mean nothing.\n"
    )
    print(f"wrote UNTRAINED checkpoint {ckpt} and PCA params {pca} (seed {args.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    try:
        settings = Settings.from_env().with_flags(args)  # the environment, read and checked once, here
        commands = {"start": start, "up": up, "down": down, "ping": lambda a, s: ping(a, s) and 0, "doctor": doctor,
                    "make-checkpoint": make_checkpoint}
        return commands[args.command](args, settings)
    except Exception as e:  # the project's, the machine's or the broker's: one line, no traceback
        error = as_pipeline_error(e)
        if error is None:
            raise
        print(f"worker: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
