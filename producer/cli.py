"""`producer`: enqueue a spectrogram file as chunks, follow the job, finalize it, or run it all locally."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from worker.errors import PipelineError
from worker.message import EMBEDDING_FORMS

CHECKPOINT_ENV = "VGGISH_CHECKPOINT"
DEFAULT_CSV = "wavfile_df.csv"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="producer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def job_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", type=Path, help="spectrograms: raw float64, N x 96 x 64 (e.g. wavfile_spec.dat)")
        p.add_argument("--csv", type=Path, help=f"the frame, one row per spectrogram (default: {DEFAULT_CSV} beside SPEC)")
        p.add_argument("--out", type=Path, help="job folder for shards and outputs (default: SPEC's folder)")
        p.add_argument("--chunk-rows", type=int, help="rows per chunk (default: from job size and worker count)")
        p.add_argument("--embedding", choices=EMBEDDING_FORMS, default="relu", help="128-d layer form (default relu, as the seed)")
        p.add_argument("--checkpoint", type=Path, help=f"pin the job to this checkpoint (env {CHECKPOINT_ENV})")

    enqueue = sub.add_parser("enqueue", help="plan chunks and send one message per chunk that has no shard")
    job_inputs(enqueue)
    enqueue.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL)")
    enqueue.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    run = sub.add_parser("run", help="all on this machine: private Redis, N workers, enqueue, wait, finalize")
    job_inputs(run)
    run.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    run.add_argument("--pca-params", type=Path, help="also write wavfile_embed_pca.dat (uint8)")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    wait = sub.add_parser("wait", help="block with a progress line until every chunk has a shard")
    wait.add_argument("dir", type=Path)
    wait.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL); lets wait re-send lost chunks")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds")

    status = sub.add_parser("status", help="rows and chunks done, failures, chunks per worker, live workers")
    status.add_argument("dir", type=Path)
    status.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL); adds the live workers")
    status.add_argument("--json", action="store_true")

    finalize = sub.add_parser("finalize", help="merge the shards into wavfile_embed.csv / .dat")
    finalize.add_argument("dir", type=Path)
    finalize.add_argument("--pca-params", type=Path, help="also write wavfile_embed_pca.dat (uint8)")
    finalize.add_argument("--json", action="store_true")

    sample = sub.add_parser("sample-data", help="write synthetic wavfile_spec.dat and wavfile_df.csv")
    sample.add_argument("out_dir", type=Path)
    sample.add_argument("--rows", type=int, default=300)
    sample.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def checkpoint_arg(args: argparse.Namespace) -> Path | None:
    if args.checkpoint:
        return args.checkpoint
    return Path(os.environ[CHECKPOINT_ENV]) if os.environ.get(CHECKPOINT_ENV) else None


def plan(args: argparse.Namespace, workers: int):
    from producer.plan import plan_job
    from worker.checkpoint import fingerprint

    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise PipelineError("--chunk-rows must be at least 1")
    checkpoint = checkpoint_arg(args)
    model = fingerprint(checkpoint) if checkpoint else None
    frame = args.csv or args.spec.parent / DEFAULT_CSV
    out_dir = args.out or args.spec.parent
    return plan_job(args.spec, frame, out_dir, args.embedding, args.chunk_rows, workers, model)


def report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>16}: {value}")


def cmd_enqueue(args: argparse.Namespace) -> int:
    from producer.plan import send
    from worker import broker

    app = broker.make_app(broker.broker_url(args.broker))
    broker.check_connection(app)
    workers = len(app.control.ping(timeout=1.0) or []) if args.chunk_rows is None else 1
    planned = plan(args, workers)
    send(app, planned.job, planned.send)
    report({**planned.summary(), "broker": broker.redact(app.conf.broker_url)}, args.json)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from producer.finalize import finalize
    from producer.local import LocalRedis
    from producer.plan import send
    from producer.postprocess import PCA
    from producer.progress import wait
    from producer.recovery import Recovery
    from worker import broker, checkpoint
    from worker.devices import gpu_ids
    from worker.fleet import Fleet

    ckpt = checkpoint_arg(args)
    if ckpt is None:
        raise PipelineError(f"no checkpoint: pass --checkpoint or set {CHECKPOINT_ENV}")
    checkpoint.read_variables(ckpt)  # a bad checkpoint fails here, before anything starts
    pca = PCA(args.pca_params) if args.pca_params else None
    if args.workers < 1:
        raise PipelineError("--workers must be at least 1")
    planned = plan(args, args.workers)
    job = planned.job
    roots = sorted({Path(job.source).parent, Path(job.out_dir)})
    redis = LocalRedis()
    workers = None
    try:
        redis.start()
        common = ["--broker", redis.url, "--checkpoint", str(ckpt), *(f"--data-root={r}" for r in roots)]
        gpus = gpu_ids()[: args.workers]
        workers = Fleet.plan(gpus, args.workers, common, prefix="local-", log_dir=Path(job.out_dir) / "logs").start()
        app = broker.make_app(redis.url)
        send(app, job, planned.send)
        recovery = Recovery(app, job)
        print(
            f"job {job.id}: {job.rows} rows, {len(planned.send)} chunks to embed "
            f"({sum(c.rows for c in planned.reused)} rows reused) on {args.workers} local workers",
            file=sys.stderr,
        )
        wait(job, check=lambda: (workers.check(), recovery()))
    except KeyboardInterrupt:
        print(f"\ninterrupted: shards so far are kept in {job.out_dir}; run the same command to go on", file=sys.stderr)
        return 130
    finally:
        if workers:
            workers.stop()
        redis.stop()
    result = finalize(job, pca)
    report({**planned.summary(), **result}, args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from producer.job import Job
    from producer.progress import wait
    from producer.recovery import Recovery
    from worker import broker

    job = Job.load(args.dir)
    app = broker.optional_app(args.broker)
    if app is None:
        print("no broker configured: watching shards only, lost chunks will not be re-sent", file=sys.stderr)
    wait(job, timeout=args.timeout, check=Recovery(app, job) if app else None)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from producer.job import Job
    from producer.progress import job_status, progress_line
    from worker import broker

    status = job_status(Job.load(args.dir), per_worker=True)
    live = None
    app = broker.optional_app(args.broker)
    if app is not None:
        broker.check_connection(app)
        live = broker.live_workers(app)
    if args.json:
        print(json.dumps({**status.to_dict(), "live_workers": live}))
        return 0
    print(f"job {status.job}: " + progress_line(status, 0.0).split("  ETA")[0])
    print(f"chunks {status.chunks_done}/{status.chunks_total} done, {len(status.failed)} failed")
    for f in status.failed:
        print(f"  failed rows {f['start']}-{f['stop']} on {f['worker']}: {f['reason']}")
    for name, w in sorted(status.workers.items()):
        print(f"  {name}: {w['chunks']} chunks, {w['rows']} rows, {w['rows_per_s']} rows/s")
    if live is not None:
        print(f"live workers: {len(live)}")
        for name, w in sorted(live.items()):
            print(f"  {name}: {w.get('device')}, {w.get('chunks')} chunks, {w.get('rows_per_s')} rows/s")
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    from producer.finalize import finalize
    from producer.job import Job
    from producer.postprocess import PCA

    pca = PCA(args.pca_params) if args.pca_params else None
    report(finalize(Job.load(args.dir), pca), args.json)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from producer.dataset import write_sample

    if args.rows < 1:
        raise PipelineError("--rows must be at least 1")
    spec, frame = write_sample(args.out_dir, args.rows, args.seed)
    print(f"wrote {args.rows} synthetic spectrograms to {spec} and {frame}")
    return 0


COMMANDS = {
    "enqueue": cmd_enqueue,
    "run": cmd_run,
    "wait": cmd_wait,
    "status": cmd_status,
    "finalize": cmd_finalize,
    "sample-data": cmd_sample,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse(argv)
    try:
        return COMMANDS[args.command](args)
    except PipelineError as e:
        print(f"producer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
