"""Scaling: workers join and leave a running job (pinning to devices: test_devices)."""

from __future__ import annotations

import json

import numpy as np
from conftest import cli
from test_faults import enqueue, finish, shards, wait_for


def grow(sample: dict, times: int) -> None:
    """Repeat the sample's rows `times` over, so a job outlasts a worker's start-up."""
    data = sample["spec"].read_bytes()
    sample["spec"].write_bytes(data * times)
    header, *rows = sample["csv"].read_text().splitlines(keepends=True)
    sample["csv"].write_text(header + "".join(rows * times))


def test_scale_up_then_down_mid_job(sample, workers, redis_url, expected):
    grow(sample, 5)
    expected = {"relu": np.tile(expected["relu"], (5, 1))}
    enqueue(sample, redis_url, 50)  # 20 chunks
    workers.start("first", [sample["dir"]], "--batch-size", "5")
    wait_for(lambda: len(shards(sample["dir"])) >= 1, what="the first worker's first shard")
    workers.start("second", [sample["dir"]])  # joins the running job
    wait_for(lambda: "embedded" in workers.log("second"), what="the second worker to take a chunk")
    live = json.loads(cli("producer", "status", str(sample["dir"]), "--broker", redis_url, "--json").stdout)["live_workers"]
    assert set(live) == {"first@test", "second@test"} and live["second@test"]["device"] == "CPU"
    down = cli("worker", "down", "first@test", "--broker", redis_url)
    assert down.returncode == 0, down.stderr
    assert workers.procs["first"].wait(120) == 0  # it finished its chunk and left
    finish(sample, redis_url, expected)
    per_worker = json.loads(cli("producer", "status", str(sample["dir"]), "--json").stdout)["workers"]
    assert per_worker["second@test"]["chunks"] >= 1 and per_worker["first@test"]["chunks"] >= 1
    assert sum(w["chunks"] for w in per_worker.values()) == 20  # nothing redone


def test_a_worker_with_another_model_hands_chunks_back_to_one_with_the_jobs(sample, workers, redis_url, expected, tmp_path):
    """A mixed fleet: the job is pinned to model A; a worker with model B hands its chunks back
    instead of failing them, and the worker with A embeds them all."""
    from worker.checkpoint import write_untrained_checkpoint

    (tmp_path / "other").mkdir()
    other = write_untrained_checkpoint(tmp_path / "other" / "b.ckpt", seed=1)
    enqueued = cli("producer", "enqueue", str(sample["spec"]), "--broker", redis_url, "--chunk-rows", "50",
                   "--checkpoint", str(workers.checkpoint), "--json")
    assert enqueued.returncode == 0, enqueued.stderr
    workers.start("b", [sample["dir"]], "--checkpoint", str(other))
    wait_for(lambda: "handed back" in workers.log("b"), what="the other model's worker to hand a chunk back")
    status = json.loads(cli("producer", "status", str(sample["dir"]), "--broker", redis_url, "--json").stdout)
    assert status["failed"] == [] and "no live worker has this job's model" in status["model_note"]
    workers.start("a", [sample["dir"]])
    finish(sample, redis_url, expected)
    per_worker = json.loads(cli("producer", "status", str(sample["dir"]), "--json").stdout)["workers"]
    assert set(per_worker) == {"a@test"}
    assert "Traceback" not in workers.log("b"), workers.log("b")


def test_the_backlog_counts_the_chunks_a_frozen_worker_holds_and_their_rows(sample, workers, redis_url, expected):
    """The queue's length misses every chunk a worker has taken: the backlog adds kombu's unacked
    ones, so a worker frozen (SIGSTOP) with its chunk and its spare still counts them."""
    import signal

    enqueue(sample, redis_url, 20)  # 10 chunks of 20 rows
    before = json.loads(cli("producer", "status", str(sample["dir"]), "--broker", redis_url, "--json").stdout)["backlog"]
    assert before == {"chunks": 10, "queued": 10, "unacked": 0, "rows": 200}
    frozen = workers.start("frozen", [sample["dir"]], "--batch-size", "1")
    wait_for(lambda: workers.log("frozen").count(" received") == 2, what="the chunk in the model and the spare")
    frozen.send_signal(signal.SIGSTOP)
    try:
        done = len(shards(sample["dir"]))
        held = json.loads(cli("producer", "status", str(sample["dir"]), "--broker", redis_url, "--json").stdout)["backlog"]
        # every chunk without its shard (and one whose shard is written but its ack not yet sent)
        assert held["chunks"] - (10 - done) in (0, 1) and held["rows"] == 20 * held["chunks"], held
        assert held["unacked"] >= 1 and held["queued"] == held["chunks"] - held["unacked"], held  # a bare LLEN sees only "queued"
    finally:
        frozen.send_signal(signal.SIGCONT)
    finish(sample, redis_url, expected)
    after = json.loads(cli("producer", "status", str(sample["dir"]), "--broker", redis_url, "--json").stdout)["backlog"]
    assert after == {"chunks": 0, "queued": 0, "unacked": 0, "rows": 0}


def test_a_batch_worker_embeds_what_is_queued_then_leaves_when_idle(sample, workers, redis_url, expected):
    """`worker start --exit-when-idle`, as a Slurm array task or a Kubernetes Job runs it: it takes
    the job, and once no chunk has come for the given seconds, it leaves with exit 0."""
    enqueue(sample, redis_url, 50)
    batch = workers.start("batch", [sample["dir"]], "--exit-when-idle", "2")
    finish(sample, redis_url, expected)
    assert batch.wait(60) == 0, workers.log("batch")
    assert "no chunk for 2 s: leaving (--exit-when-idle)" in workers.log("batch")
    assert "Traceback" not in workers.log("batch")
