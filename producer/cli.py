"""`producer`: enqueue a spectrogram file as chunks, follow the job, finalize it, or run it all locally."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from producer.compact import COMPACT_AFTER
from producer.run import DEFAULT_CSV
from vggish_pipeline.core import package_version, store
from vggish_pipeline.core.errors import EXIT_CODES, INTERRUPTED, SKIPPED, JobFailed, UsageError, as_pipeline_error
from vggish_pipeline.core.message import DEFAULT_EMBEDDING, EMBEDDING_FORMS
from vggish_pipeline.core.settings import CHECKPOINT_ENV, METRICS_ENV, Settings, add_tls_flags, location_arg, variables_help

if TYPE_CHECKING:
    from producer.clips import ClipOptions
    from producer.run import JobInputs


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="producer", description=__doc__,
        epilog=EXIT_CODES + "\n" + variables_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_job_commands(sub)
    add_follow_commands(sub)
    add_clip_commands(sub)
    return parser.parse_args(argv)


def add_job_commands(sub) -> None:
    def job_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", type=location_arg, help="spectrograms: raw float64, N x 96 x 64 (e.g. wavfile_spec.dat)")
        p.add_argument("--csv", type=location_arg, help=f"the frame, one row per spectrogram (default: {DEFAULT_CSV} beside SPEC)")
        p.add_argument("--out", type=location_arg, help="job folder for shards and outputs (default: SPEC's folder)")
        p.add_argument("--chunk-rows", type=int, help="rows per chunk (default: from job size and worker count)")
        p.add_argument("--embedding", choices=EMBEDDING_FORMS, default=DEFAULT_EMBEDDING,
                       help=f"128-d layer form (default {DEFAULT_EMBEDDING}, as the seed)")
        p.add_argument("--checkpoint", type=location_arg, help=f"pin the job to this checkpoint (env {CHECKPOINT_ENV})")

    enqueue = sub.add_parser("enqueue", help="plan chunks and send one message per chunk that has no shard")
    job_inputs(enqueue)
    enqueue.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL)")
    add_tls_flags(enqueue)
    enqueue.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    run = sub.add_parser("run", help="all on this machine: private Redis, N workers, enqueue, wait, finalize")
    job_inputs(run)
    run.add_argument(
        "--workers", type=int, help="at most this many local workers (default: one per granted GPU or MIG slice; with none, 1 CPU worker)"
    )
    run.add_argument("--pca-params", type=location_arg, help="also write wavfile_embed_pca.dat (uint8)")
    run.add_argument("--parquet", action="store_true", help="also write wavfile_embed.parquet (the frame plus e0..e127)")
    run.add_argument("--broker", help="use this broker's workers instead of starting local ones (no environment fallback: "
                     "a VGGISH_BROKER_URL set for workers does not move a run off this machine)")
    add_tls_flags(run)
    add_metrics_flag(run, "the job's progress, the backlog and the live workers; local workers on PORT+1…")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def add_metrics_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help=f"serve Prometheus metrics at :PORT/metrics: {what} (env {METRICS_ENV})")


def add_follow_commands(sub) -> None:
    wait = sub.add_parser("wait", help="block with a progress line until every chunk has a shard")
    wait.add_argument("dir", type=location_arg, help="the job folder (holds job.json and shards/)")
    wait.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL); lets wait re-send lost chunks")
    add_tls_flags(wait)
    wait.add_argument("--timeout", type=float, help="give up after this many seconds")
    add_metrics_flag(wait, "the job's progress, and with a broker the backlog and the live workers")

    status = sub.add_parser("status", help="rows and chunks done, failures, chunks per worker, live workers")
    status.add_argument("dir", type=location_arg, help="the job folder")
    status.add_argument("--broker", help="broker URL (env VGGISH_BROKER_URL); adds the live workers")
    add_tls_flags(status)
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")

    compact = sub.add_parser("compact", help="merge runs of small chunks (a watch's) into chunks of the job's size, re-embedding nothing")
    compact.add_argument("dir", type=location_arg, help="the job folder; its outputs stay byte for byte as they are")
    compact.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    finalize = sub.add_parser("finalize", help="merge the shards into wavfile_embed.csv / .dat")
    finalize.add_argument("dir", type=location_arg, help="the job folder; every chunk must have its shard")
    finalize.add_argument("--pca-params", type=location_arg, help="also write wavfile_embed_pca.dat (uint8)")
    finalize.add_argument("--parquet", action="store_true", help="also write wavfile_embed.parquet (the frame plus e0..e127)")
    finalize.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def add_clip_commands(sub) -> None:
    def clip_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spec", type=Path, required=True, help="the .dat to append to (created with the CSV if neither exists)")
        p.add_argument("--csv", type=Path, help=f"the frame to append to (default: {DEFAULT_CSV} beside SPEC)")
        p.add_argument("--label", help="label for every clip")
        p.add_argument("--label-from-folder", action="store_true", help="label each clip by its folder (LABEL/clip.wav)")
        p.add_argument("--valid", action="store_true", help="mark the new rows as validation rows (valid=True)")
        p.add_argument("--pad", action="store_true", help="zero-pad clips shorter than 0.975 s to one row")
        p.add_argument("--rows-per-file", type=int, metavar="N",
                       help="the first N rows (0.96 s examples) of each file, a shorter clip zero-padded to one; "
                            "1: one row per file, as Speech Commands' frame (default: every full example)")
        p.add_argument("--valid-list", type=Path, metavar="FILE",
                       help="valid=True for the files FILE names (paths from FILE's folder, as Speech Commands' "
                            "validation_list.txt), False for the rest")

    add = sub.add_parser("add-clips", help="append recordings (WAV, FLAC, OGG, MP3, AIFF…) to SPEC and its CSV as VGGish log-mel rows")
    add.add_argument("recordings", type=Path, nargs="*", help="audio files or folders; none: only repair a cut-off append")
    clip_options(add)
    add.add_argument("--bad-files", type=Path, metavar="REPORT",
                     help="add what can be read, list the files refused (file,reason) in REPORT, and exit 5 if any were "
                          "(default: one refused file refuses the whole add)")
    add.add_argument("--jobs", type=int, metavar="N", help="processes converting recordings (default: every CPU this process may use)")
    add.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    watch = sub.add_parser("watch", help="add recordings landing in INBOX, embed only the new rows, refresh outputs")
    watch.add_argument("inbox", type=Path, help="folder recordings land in (LABEL/clip.flac with --label-from-folder)")
    clip_options(watch)
    watch.add_argument("--out", type=location_arg, help="job folder (default: SPEC's folder)")
    watch.add_argument("--compact-after", type=int, default=COMPACT_AFTER, metavar="N",
                       help=f"merge the small chunks refreshes leave once there are N (default {COMPACT_AFTER}; 0: never)")
    watch.add_argument("--chunk-rows", type=int, help="rows per chunk (default: from job size and worker count)")
    watch.add_argument("--embedding", choices=EMBEDDING_FORMS, default=DEFAULT_EMBEDDING,
                       help=f"128-d layer form (default {DEFAULT_EMBEDDING})")
    watch.add_argument("--checkpoint", type=location_arg, help=f"checkpoint (env {CHECKPOINT_ENV})")
    watch.add_argument("--broker", help="use this broker's workers (env VGGISH_BROKER_URL); default: start local ones")
    add_tls_flags(watch)
    add_metrics_flag(watch, "each refresh's progress, the backlog and the live workers; local workers on PORT+1…")
    watch.add_argument("--autoscale", metavar="MIN:MAX",
                       help="start local workers as the backlog asks, at most MAX, and let idle ones go, keeping MIN "
                            "(0: none between recordings) (env VGGISH_AUTOSCALE; not with --broker)")
    watch.add_argument("--scale-idle", type=float, metavar="SECONDS",
                       help="with --autoscale: seconds a worker waits for a chunk before it leaves (env VGGISH_SCALE_IDLE; default 120)")
    watch.add_argument("--workers", type=int, help="at most this many local workers when there is no broker (default: as for run)")
    watch.add_argument("--pca-params", type=location_arg, help="also write wavfile_embed_pca.dat (uint8)")
    watch.add_argument("--parquet", action="store_true", help="also keep wavfile_embed.parquet (rewritten whole on each refresh)")
    watch.add_argument("--settle", type=float, default=1.0, help="seconds a file must be unchanged before it is read")
    watch.add_argument("--poll", type=float, default=0.5, help="seconds between looks at INBOX")
    watch.add_argument("--once", action="store_true", help="handle what is in INBOX now, refresh the outputs, exit")

    sample = sub.add_parser("sample-data", help="write synthetic wavfile_spec.dat and wavfile_df.csv")
    sample.add_argument("out_dir", type=Path, help="folder for wavfile_spec.dat and wavfile_df.csv")
    sample.add_argument("--rows", type=int, default=300, help="spectrogram rows (default 300)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def inputs(args: argparse.Namespace, settings: Settings) -> JobInputs:
    from producer.run import JobInputs

    return JobInputs.of(
        args.spec, args.csv, getattr(args, "out", None), getattr(args, "embedding", DEFAULT_EMBEDDING), getattr(args, "chunk_rows", None),
        settings=settings,
    )


def shown(value: object) -> str:
    """A summary's value for people: lists one item a line, workers by name and device, no reprs."""
    if isinstance(value, list):
        return "\n".join(shown(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "-" if value is None else str(value)


def report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        lines = shown(value).splitlines() or [""]
        print(f"{key.replace('_', ' '):>20}: {lines[0]}")
        for line in lines[1:]:
            print(f"{'':>20}  {line}")


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from producer.run import enqueue_job
    from vggish_pipeline.core import broker

    summary = enqueue_job(inputs(args, settings), broker.make_app(broker.broker_url(settings), settings))
    report(summary.to_dict(), args.json)
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from producer.run import run
    from vggish_pipeline.core import broker

    job = inputs(args, settings)
    app = broker.make_app(broker.broker_url(settings), settings) if args.broker else None
    try:
        summary = run(job, app=app, workers=args.workers, pca_params=args.pca_params, parquet=args.parquet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: shards so far are kept in {job.out}; run the same command to go on", file=sys.stderr)
        return INTERRUPTED
    report(summary.to_dict(), args.json)
    return 0


def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    from producer.progress import wait
    from producer.recovery import Recovery
    from producer.run import producer_metrics
    from vggish_pipeline.core import broker
    from vggish_pipeline.core.job import Job

    job = Job.load(args.dir)
    app = broker.optional_app(settings)
    if app is None:
        print("no broker configured: watching shards only, lost chunks will not be re-sent", file=sys.stderr)
    with producer_metrics(settings, app) as metrics:
        wait(job, timeout=args.timeout, check=Recovery(app, job) if app else None, metrics=metrics)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from producer.progress import job_status, progress_line
    from producer.recovery import model_note
    from vggish_pipeline.core import broker
    from vggish_pipeline.core.files import APPEND_JOURNAL, SET_JOURNAL
    from vggish_pipeline.core.job import Job

    job = Job.load(args.dir)
    status = job_status(job, per_worker=True)
    cut_short = any((args.dir / name).exists() for name in (SET_JOURNAL, APPEND_JOURNAL))
    live, note, backlog = None, None, None
    app = broker.optional_app(settings)
    if app is not None:
        broker.check_connection(app)
        live = broker.live_workers(app)
        note = None if status.done else model_note(job, live)
        backlog = broker.backlog(app)
    if args.json:
        shown_live = {name: w.to_dict() for name, w in live.items()} if live is not None else None
        print(json.dumps({**status.to_dict(), "live_workers": shown_live, "model": job.dir.pinned_model(), "model_note": note,
                          "outputs_cut_short": cut_short, "backlog": backlog.to_dict() if backlog else None}))
        return JobFailed.exit_code if status.failed else 0
    print(f"job {status.job}: " + progress_line(status, 0.0).split("  ETA")[0])
    print(f"chunks {status.chunks_done}/{status.chunks_total} done, {len(status.failed)} failed")
    for f in status.failed:
        print(f"  failed rows {f.start}-{f.stop} on {f.worker}: {f.reason}")
    for name, share in sorted(status.workers.items()):
        print(f"  {name}: {share.chunks} chunks, {share.rows} rows, {share.rows_per_s} rows/s")
    if live is not None:
        print(f"live workers: {len(live)}")
        for name, w in sorted(live.items()):
            print(f"  {name}: {w.device}, {w.chunks} chunks, {w.rows_per_s} rows/s")
    if backlog is not None:
        print(f"broker backlog: {backlog.chunks} chunks, {backlog.rows} rows ({backlog.queued} queued, "
              f"{backlog.unacked} with workers, not yet acknowledged)")
    if note:
        print(note)
    if status.outputs_rows is not None:
        print(f"outputs: {status.outputs_rows} rows (the last complete set)")
    if cut_short:
        print(f"outputs: being written now, or that was cut short; if nothing runs, `producer finalize {args.dir}` "
              "completes it (status writes nothing)")
    return JobFailed.exit_code if status.failed else 0  # scripts can tell a failed job


def cmd_finalize(args: argparse.Namespace, settings: Settings) -> int:
    from producer.finalize import finalize
    from vggish_pipeline.core.job import Job
    from vggish_pipeline.core.postprocess import PCA

    pca = PCA(args.pca_params) if args.pca_params else None
    job = Job.load(args.dir)
    written = finalize(job, pca, parquet=args.parquet)
    report(written.to_dict(), args.json)
    return 0


def cmd_compact(args: argparse.Namespace, settings: Settings) -> int:
    from producer.compact import compact_job

    report(compact_job(args.dir).to_dict(), args.json)
    return 0


def clip_options(args: argparse.Namespace) -> ClipOptions:
    from producer.clips import ClipOptions

    return ClipOptions(args.label, args.label_from_folder, args.valid, args.pad, args.rows_per_file, args.valid_list)


def cmd_add_clips(args: argparse.Namespace, settings: Settings) -> int:
    from producer.clips import add_files, locked, roll_back

    spec, csv_path = args.spec, store.local(inputs(args, settings).csv, "add-clips (it appends)")
    if not args.recordings:
        with locked(spec, csv_path):
            repaired = roll_back(spec, csv_path)
        print(f"rolled back a cut-off append to {spec}" if repaired else f"{spec}: nothing to repair", file=sys.stderr)
        return 0
    summary = add_files(spec, csv_path, args.recordings, clip_options(args), sys.stderr, bad_files=args.bad_files, jobs=args.jobs)
    report(summary, args.json)
    if summary["files_refused"]:
        n = summary["files_refused"]
        print(f"{n} file{'s' * (n != 1)} refused and skipped, listed in {args.bad_files}", file=sys.stderr)
        return SKIPPED
    return 0


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from producer.watcher import WatchLoop

    if args.autoscale and args.broker:
        raise UsageError("--autoscale scales this machine's own workers; a broker's are scaled where they run (worker up --autoscale)")

    watcher = WatchLoop(
        inputs=inputs(args, settings), inbox=args.inbox, clips=clip_options(args), workers=args.workers,
        pca_params=args.pca_params, parquet=args.parquet, settle=args.settle, poll=args.poll, compact_after=args.compact_after,
    )
    try:
        watcher.run(once=args.once)
    except KeyboardInterrupt:
        print("\nstopped watching", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace, settings: Settings) -> int:
    from producer.dataset import write_sample

    if args.rows < 1:
        raise UsageError("--rows must be at least 1")
    spec, csv_path = write_sample(args.out_dir, args.rows, args.seed)
    print(f"wrote {args.rows} synthetic spectrograms to {spec} and {csv_path}")
    return 0


COMMANDS = {
    "enqueue": cmd_enqueue,
    "run": cmd_run,
    "wait": cmd_wait,
    "status": cmd_status,
    "finalize": cmd_finalize,
    "compact": cmd_compact,
    "sample-data": cmd_sample,
    "add-clips": cmd_add_clips,
    "watch": cmd_watch,
}


def main(argv: list[str] | None = None) -> int:
    import signal

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does: cleanly
    try:
        return COMMANDS[args.command](args, Settings.from_env().with_flags(args))  # the environment, read and checked once, here
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # the project's, the machine's or the broker's: one line, no traceback
        error = as_pipeline_error(e)
        if error is None:
            raise
        print(f"producer: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
