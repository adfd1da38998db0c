"""Faults a long job meets, each really done: kill -9, SIGTERM, a Redis restart, duplicates, poison."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, merged_env, unavailable
from outputs import check_outputs


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def enqueue(sample: dict, broker: str, chunk_rows: int) -> dict:
    result = cli("producer", "enqueue", str(sample["spec"]), "--broker", broker, "--chunk-rows", str(chunk_rows), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def shards(directory: Path) -> list[Path]:
    return sorted((directory / "shards").glob("*.npz"))


def status(directory: Path) -> dict:
    return json.loads(cli("producer", "status", str(directory), "--json").stdout)


def finish(sample: dict, broker: str, expected, timeout: float = 240) -> float:
    began = time.monotonic()
    waited = cli("producer", "wait", str(sample["dir"]), "--broker", broker, "--timeout", str(timeout))
    assert waited.returncode == 0, waited.stderr
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
    check_outputs(sample["dir"], sample["csv"], expected["relu"])
    return time.monotonic() - began


def test_worker_killed_mid_chunk_is_recovered_within_two_minutes(sample, workers, redis_url, expected):
    workers.start("victim", [sample["dir"]], "--batch-size", "4")
    enqueue(sample, redis_url, 100)
    wait_for(lambda: "received" in workers.log("victim"), what="the victim to take a chunk")
    workers.procs["victim"].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    workers.procs["victim"].wait()
    workers.start("rescuer", [sample["dir"]])
    finish(sample, redis_url, expected)
    recovered = time.monotonic() - killed_at
    assert recovered < 120, f"took {recovered:.0f}s after the kill"
    assert all(w == "rescuer@test" for w in status(sample["dir"])["workers"])


def test_sigterm_finishes_the_current_chunk_and_loses_nothing(sample, workers, redis_url, expected):
    workers.start("leaving", [sample["dir"]], "--batch-size", "4")
    enqueue(sample, redis_url, 100)
    # Both chunks: one in the model, one held beside it, read and waiting (the worker's one spare).
    wait_for(lambda: workers.log("leaving").count(" received") == 2, what="the chunk in the model and the one waiting for it")
    workers.procs["leaving"].send_signal(signal.SIGTERM)
    assert workers.procs["leaving"].wait(120) == 0
    assert len(shards(sample["dir"])) == 1  # it finished the chunk it had, and took no other
    assert "the worker is stopping; handed back before the model" in workers.log("leaving")  # the spare went back
    assert "Traceback" not in workers.log("leaving"), workers.log("leaving")  # an expected hand-back is a line
    workers.start("staying", [sample["dir"]])
    finish(sample, redis_url, expected)
    per_worker = status(sample["dir"])["workers"]
    assert per_worker["leaving@test"]["chunks"] == 1 and per_worker["staying@test"]["chunks"] == 1  # nothing redone


def test_redis_restart_without_persistence_mid_job(sample, workers, redis_server, redis_url, expected):
    enqueue(sample, redis_url, 50)
    workers.start("w1", [sample["dir"]], "--batch-size", "8")
    wait_for(lambda: len(shards(sample["dir"])) >= 1, what="a first shard")
    redis_server.stop()  # queue and unacked messages are gone
    redis_server.start()
    kept = {p.name for p in shards(sample["dir"])}
    finish(sample, redis_url, expected)
    assert kept <= {p.name for p in shards(sample["dir"])}  # shards from before the restart were kept


def test_a_broker_lost_while_a_chunk_runs_and_the_next_is_asked_for_leaves_the_worker_up(sample, workers, redis_server, redis_url, expected):
    """One chunk for the whole job: the worker runs it with a place free, so its ask for the next
    (a blocking pop) is in flight when Redis goes. Celery 5.7.0 then crashed the worker
    ("Unrecoverable error") closing the lost connection; the worker must log one line and reconnect."""
    enqueue(sample, redis_url, 200)
    worker = workers.start("w1", [sample["dir"]], "--batch-size", "8")
    wait_for(lambda: "received" in workers.log("w1"), what="the chunk to be taken")
    redis_server.stop()
    redis_server.start()
    wait_for(lambda: workers.log("w1").count("Connected to") >= 2, timeout=60, what="the worker to reconnect")
    finish(sample, redis_url, expected)
    assert worker.poll() is None, workers.log("w1")
    assert "Traceback" not in workers.log("w1") and "Unrecoverable" not in workers.log("w1"), workers.log("w1")


def test_broker_restarted_twice_and_a_worker_suspended_past_the_resend_while_wait_runs(sample, workers, redis_server, redis_url, expected):
    """Long-running faults in one job: Redis restarted twice (no persistence) and a worker stopped
    (SIGSTOP, as a suspended VM) long enough for its chunk to be re-sent, then resumed."""
    enqueue(sample, redis_url, 20)
    workers.start("w1", [sample["dir"]], "--batch-size", "8")
    stopped = workers.start("w2", [sample["dir"]], "--batch-size", "8")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "producer", "wait", str(sample["dir"]), "--broker", redis_url, "--timeout", "400"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: len(shards(sample["dir"])) >= 1, what="a first shard")
        os.kill(stopped.pid, signal.SIGSTOP)
        for _ in range(2):
            redis_server.stop()
            redis_server.start()
            time.sleep(3)
        time.sleep(12)  # past the re-send of what w2 held
        os.kill(stopped.pid, signal.SIGCONT)
        _, said = waiting.communicate(timeout=400)
        assert waiting.returncode == 0, said
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
    check_outputs(sample["dir"], sample["csv"], expected["relu"])
    for name in ("w1", "w2"):
        assert "Traceback" not in workers.log(name), workers.log(name)


def test_a_chunk_delivered_twice_gives_one_valid_shard(sample, workers, redis_url, expected):
    from producer import plan
    from vggish_pipeline.core.broker import make_app
    from vggish_pipeline.core.job import Job
    from vggish_pipeline.core.settings import Settings

    enqueue(sample, redis_url, 50)
    job = Job.load(sample["dir"])
    plan.enqueue(make_app(redis_url, Settings()), job, job.chunks)  # every chunk a second time, as a redelivery would
    workers.start("w1", [sample["dir"]])
    workers.start("w2", [sample["dir"]])
    finish(sample, redis_url, expected)
    assert len(shards(sample["dir"])) == 4
    assert not [p for p in (sample["dir"] / "shards").iterdir() if p.suffix != ".npz"]  # no temp files left


def test_poison_chunk_is_retried_then_recorded_and_finalize_names_it(sample, workers, redis_url):
    enqueue(sample, redis_url, 200)
    shard_dir = sample["dir"] / "shards"
    shard_dir.rmdir()
    shard_dir.write_text("not a folder")  # every attempt to write the shard fails
    workers.start("w1", [sample["dir"]])
    waited = cli("producer", "wait", str(sample["dir"]), "--broker", redis_url, "--timeout", "120")
    assert waited.returncode == 1 and "1 chunks failed: rows 0-200 (failed 3 times" in waited.stderr, waited.stderr
    assert workers.log("w1").count("retrying") == 2
    assert status(sample["dir"])["failed"][0]["worker"] == "w1@test"
    assert cli("producer", "status", str(sample["dir"])).returncode == 1  # a script can tell
    refused = cli("producer", "finalize", str(sample["dir"]))
    assert refused.returncode == 1 and "rows 0-200: failed 3 times" in refused.stderr
    assert not list(sample["dir"].glob("wavfile_embed*"))


def test_a_failed_finalize_leaves_no_output_and_a_rerun_is_correct(sample, redis_url, workers, expected):
    enqueue(sample, redis_url, 100)
    workers.start("w1", [sample["dir"]])
    assert cli("producer", "wait", str(sample["dir"]), "--broker", redis_url, "--timeout", "120").returncode == 0
    original = sample["csv"].read_text()
    sample["csv"].write_text(original + "200,extra.wav,yes,True\n")  # the CSV grew after enqueue
    failed = cli("producer", "finalize", str(sample["dir"]))
    assert failed.returncode == 3 and "the CSV changed since enqueue" in failed.stderr
    assert not [p for p in os.listdir(sample["dir"]) if "wavfile_embed" in p]  # no output, no temp file
    sample["csv"].write_text(original)
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout
        kids = [int(p) for p in out.split()]
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie nobody has reaped yet (a container's PID 1 may not reap)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_kill_9_of_producer_run_takes_all_it_started_and_a_rerun_finishes(sample, model_files, expected):
    from test_scaling import grow

    grow(sample, 3)
    expected = {"relu": np.tile(expected["relu"], (3, 1))}
    args = [sys.executable, "-m", "producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]),
            "--workers", "2", "--chunk-rows", "50"]
    env = merged_env({"CUDA_VISIBLE_DEVICES": "-1"})  # two CPU workers, whatever the machine has
    run = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(shards(sample["dir"])) >= 1, what="a first shard")
        started = descendants(run.pid)
        assert len(started) >= 3  # a Redis and two workers
    finally:
        run.kill()
        run.wait()
    wait_for(lambda: not any(alive(p) for p in started), timeout=30, what="everything the killed run started to end")
    rerun = subprocess.run(args, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def test_producer_run_whose_private_redis_is_killed_starts_it_again_and_finishes(sample, model_files, expected):
    """An OOM kill of the private Redis mid-job: the run says so in one line, starts it again, re-sends
    what was lost, and ends with the reference outputs, nothing embedded twice into them."""
    args = [sys.executable, "-m", "producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]),
            "--workers", "1", "--chunk-rows", "20"]
    log = sample["dir"].parent / "run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen(args, env=merged_env({"CUDA_VISIBLE_DEVICES": "-1"}), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(shards(sample["dir"])) >= 2, what="two shards")
        redis = [p for p in descendants(run.pid) if "redis-server" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(redis) == 1
        os.kill(redis[0], signal.SIGKILL)
        assert run.wait(300) == 0, log.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    said = log.read_text()
    assert "the private redis-server exited (signal 9); starting it again" in said and "Traceback" not in said
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def test_kill_9_of_worker_up_stops_its_workers(redis_url, model_files, tmp_path):
    up = subprocess.Popen([sys.executable, "-m", "worker", "up", "--cpus", "2", "--broker", redis_url, "--checkpoint",
                           str(model_files["checkpoint"]), "--data-root", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(descendants(up.pid)) == 2, timeout=30, what="two workers")
        started = descendants(up.pid)
    finally:
        up.kill()
        up.wait()
    wait_for(lambda: not any(alive(p) for p in started), timeout=60, what="the workers of a killed `worker up` to stop")


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 KiB filesystem (tmpfs), to fill up; root only, as in CI (never skipped there)."""
    if os.geteuid() != 0:
        unavailable("mounting a small filesystem needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_a_rerun_finishes(sample, model_files, expected, small_disk, machine):
    args = ["producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--out", str(small_disk),
            "--chunk-rows", "100", "--workers", "1"]
    full = cli(*args)
    assert full.returncode == 3 and "Traceback" not in full.stderr, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"producer: error: cannot write {small_disk}(/wavfile_embed\S*)?: No space left on device", last), last
    assert not [p.name for p in small_disk.iterdir() if "wavfile_embed" in p.name]  # no output, no temp file
    assert len(shards(small_disk)) == 2  # the embeddings are kept
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space is freed
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    check_outputs(small_disk, sample["csv"], expected["relu"])


def test_messages_the_job_never_planned_do_not_poison_it(sample, workers, redis_url, expected, tmp_path):
    from vggish_pipeline.core.broker import make_app
    from vggish_pipeline.core.job import Job
    from vggish_pipeline.core.message import QUEUE, TASK_NAME
    from vggish_pipeline.core.settings import Settings

    enqueue(sample, redis_url, 64)
    job = Job.load(sample["dir"])
    planned = job.message(job.chunks[0]).encode()
    outside = tmp_path / "elsewhere.dat"
    outside.write_bytes(sample["spec"].read_bytes())
    forged = [
        {**planned, "source": str(outside)},  # a source outside the data roots
        {**planned, "digest": "0" * 32},  # a stale message: rows the plan no longer has
        {**planned, "stop": 50},  # a range the plan never cut
    ]
    app = make_app(redis_url, Settings())
    for payload in forged:
        app.send_task(TASK_NAME, kwargs=payload, queue=QUEUE)
    workers.start("w1", [sample["dir"]])
    wait_for(lambda: workers.log("w1").count("nothing recorded") == len(forged), what="the forged messages to be refused")
    finish(sample, redis_url, expected)
    assert status(sample["dir"])["failed"] == []
    # A failure record beside a valid shard (a refusal that lost a race with a good run) changes nothing.
    (sample["dir"] / "failed" / f"{0:012d}-{64:012d}.json").write_text(json.dumps({"start": 0, "stop": 64, "reason": "x", "worker": "w"}))
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
    assert status(sample["dir"])["failed"] == []


CRASH_MID_PUBLISH = r"""
import os, sys
real, renamed = os.replace, []
def replace_then_crash(src, dst):
    real(src, dst)
    renamed.append(dst)
    if len(renamed) == 2:  # the set's journal, then its first output: then the power goes
        os._exit(9)
os.replace = replace_then_crash
from producer.cli import main
main(["finalize", sys.argv[1]])
"""


def test_a_crash_between_finalizes_renames_never_leaves_files_of_two_sets(sample, workers, redis_url, expected):
    enqueue(sample, redis_url, 100)
    workers.start("w1", [sample["dir"]])
    assert cli("producer", "wait", str(sample["dir"]), "--broker", redis_url, "--timeout", "120").returncode == 0
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
    out = sample["dir"] / "wavfile_embed.csv"
    old = out.read_text()
    sample["csv"].write_text(sample["csv"].read_text().replace(",yes,", ",YES,"))  # the next set's CSV differs
    crashed = subprocess.run([sys.executable, "-c", CRASH_MID_PUBLISH, str(sample["dir"])], capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr
    assert (sample["dir"] / ".publish-journal.json").exists() and out.read_text() == old  # cut mid-publication
    before = sorted((p.name, p.stat().st_mtime_ns) for p in sample["dir"].iterdir())
    status = cli("producer", "status", str(sample["dir"]))
    assert status.returncode == 0 and "cut short" in status.stdout, status.stdout  # it says so, and writes nothing
    assert sorted((p.name, p.stat().st_mtime_ns) for p in sample["dir"].iterdir()) == before
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0  # the next writer finishes it first
    assert not [p.name for p in sample["dir"].iterdir() if p.name.startswith(".")]  # no journal, no temp file
    assert out.read_text() != old
    check_outputs(sample["dir"], sample["csv"], expected["relu"])  # the new set, whole


def test_a_job_folder_renamed_or_copied_is_the_job_where_it_is_now(sample, model_files, expected, machine):
    import shutil

    run = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--chunk-rows", "50")
    assert run.returncode == 0, run.stderr
    moved = sample["dir"].with_name("moved")
    sample["dir"].rename(moved)
    for output in moved.glob("wavfile_embed*"):
        output.unlink()
    status = json.loads(cli("producer", "status", str(moved), "--json").stdout)
    assert status["chunks_done"] == 4 and status["rows_done"] == 200
    finalized = cli("producer", "finalize", str(moved))
    assert finalized.returncode == 0, finalized.stderr
    check_outputs(moved, moved / "wavfile_df.csv", expected["relu"])

    copy = moved.with_name("copy")
    shutil.copytree(moved, copy)
    (copy / "wavfile_embed.dat").unlink()
    assert cli("producer", "finalize", str(copy)).returncode == 0
    check_outputs(copy, copy / "wavfile_df.csv", expected["relu"])  # into the copy, from the copy
    assert (moved / "wavfile_embed.dat").read_bytes() == (copy / "wavfile_embed.dat").read_bytes()
