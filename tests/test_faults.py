"""Faults a long job meets, each really done: kill -9, SIGTERM, a Redis restart, duplicates, poison."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import cli
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
    wait_for(lambda: "received" in workers.log("leaving"), what="a chunk to start")
    workers.procs["leaving"].send_signal(signal.SIGTERM)
    assert workers.procs["leaving"].wait(120) == 0
    assert len(shards(sample["dir"])) == 1  # it finished the chunk it had, and took no other
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


def test_a_chunk_delivered_twice_gives_one_valid_shard(sample, workers, redis_url, expected):
    from producer.job import Job
    from producer.plan import send
    from worker.broker import make_app

    enqueue(sample, redis_url, 50)
    job = Job.load(sample["dir"])
    send(make_app(redis_url), job, job.chunks)  # every chunk a second time, as a redelivery would
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
    assert waited.returncode == 2 and "1 chunks failed: rows 0-200 (failed 3 times" in waited.stderr, waited.stderr
    assert workers.log("w1").count("retrying") == 2
    assert status(sample["dir"])["failed"][0]["worker"] == "w1@test"
    refused = cli("producer", "finalize", str(sample["dir"]))
    assert refused.returncode == 2 and "rows 0-200: failed 3 times" in refused.stderr
    assert not list(sample["dir"].glob("wavfile_embed*"))


def test_a_failed_finalize_leaves_no_output_and_a_rerun_is_correct(sample, redis_url, workers, expected):
    enqueue(sample, redis_url, 100)
    workers.start("w1", [sample["dir"]])
    assert cli("producer", "wait", str(sample["dir"]), "--broker", redis_url, "--timeout", "120").returncode == 0
    original = sample["csv"].read_text()
    sample["csv"].write_text(original + "200,extra.wav,yes,True\n")  # the CSV grew after enqueue
    failed = cli("producer", "finalize", str(sample["dir"]))
    assert failed.returncode == 2 and "the CSV changed since enqueue" in failed.stderr
    assert not [p for p in os.listdir(sample["dir"]) if "wavfile_embed" in p]  # no output, no temp file
    sample["csv"].write_text(original)
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
    check_outputs(sample["dir"], sample["csv"], expected["relu"])
