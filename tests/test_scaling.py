"""Scaling: workers join and leave a running job (pinning to devices: test_devices)."""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
from conftest import cli
from test_faults import enqueue, finish, shards, status, wait_for


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


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 now."""
    import socket

    from conftest import free_port

    while True:
        base = free_port()
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def scrape(port: int) -> str | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def sample_value(text: str, name: str) -> float:
    """The value of the series `name` (with its labels, as exposed) in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            if (f"{s.name}{{{labels}}}" if labels else s.name) == name:
                return s.value
    raise KeyError(name)


def test_metrics_of_a_live_worker_and_a_live_wait_count_the_job_and_pass_promtool(sample, workers, redis_url, expected, tmp_path):
    """Scraped during the job and after it: the worker's rows and chunks equal what it embedded,
    the producer's wait shows the job and the backlog, and Prometheus' own linter passes both."""
    import shutil
    import subprocess
    import sys

    from conftest import free_port, unavailable

    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("no promtool (apt-get install prometheus): the metrics are checked with it")
    worker_port, wait_port = free_port(), free_port()
    enqueue(sample, redis_url, 50)  # 4 chunks of 50 rows
    workers.start("m", [sample["dir"]], "--batch-size", "2", "--metrics-port", str(worker_port))
    waiting = subprocess.Popen([sys.executable, "-m", "producer", "wait", str(sample["dir"]), "--broker", redis_url,
                                "--metrics-port", str(wait_port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    while waiting.poll() is None:
        text = scrape(wait_port)
        if text is not None and "vggish_job_rows 200.0" in text:
            seen.append(text)
        time.sleep(0.05)
    assert waiting.returncode == 0, waiting.stderr.read().decode()
    assert seen, "the wait's metrics were never scraped while it ran"
    producer = seen[-1]
    assert sample_value(producer, "vggish_job_chunks") == 4 and 0 <= sample_value(producer, "vggish_job_rows_done") <= 200
    assert "vggish_backlog_chunks" in producer and "vggish_live_workers" in producer
    finish(sample, redis_url, expected)
    worker = scrape(worker_port)
    assert worker is not None
    assert sample_value(worker, "vggish_rows_embedded_total") == 200  # every row of the job, by the only worker
    assert sample_value(worker, 'vggish_chunks_total{outcome="embedded"}') == 4
    assert sample_value(worker, "vggish_chunk_compute_seconds_count") == 4 and sample_value(worker, "vggish_model_load_seconds") > 0
    assert sample_value(worker, 'vggish_worker_info{device="CPU",model="' + status(sample["dir"])["model"] + '",worker="m@test"}') == 1
    for text in (producer, worker):
        linted = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert linted.returncode == 0, linted.stdout.decode() + linted.stderr.decode()


def test_worker_up_autoscale_starts_workers_for_a_job_and_lets_them_go_when_idle(sample, redis_url, model_files, expected, tmp_path):
    """`worker up --gpus all --autoscale 0:2` on the 4-GPU stand-in: nothing runs while the queue
    is empty; a job brings up workers (at most 2, on distinct devices) that embed it; after the
    idle time none is left, and `worker up` itself stops with SIGTERM."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    from conftest import STANDIN

    log = tmp_path / "up.log"
    env = {**os.environ, "PATH": f"{STANDIN}{os.pathsep}{os.environ['PATH']}", "VGGISH_ALLOW_CPU_FALLBACK": "1",
           "PYTHONUNBUFFERED": "1"}
    base = free_ports(4)
    args = [sys.executable, "-m", "worker", "up", "--gpus", "all", "--autoscale", "0:2", "--scale-idle", "3",
            "--broker", redis_url, "--checkpoint", str(model_files["checkpoint"]), "--data-root", str(sample["dir"]),
            "--metrics-port", str(base)]
    rows: dict[int, float] = {}  # the rows each worker's /metrics said it embedded, last seen
    stop = threading.Event()

    def watch_metrics() -> None:
        while not stop.is_set():
            for port in range(base, base + 4):
                text = scrape(port)
                if text is not None:
                    rows[port] = sample_value(text, "vggish_rows_embedded_total")
            time.sleep(0.2)

    threading.Thread(target=watch_metrics, daemon=True).start()
    with open(log, "wb") as out:
        up = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "autoscale: 0 to 2 workers" in log.read_text(), what="the autoscaler to start looking")
        time.sleep(3)
        assert "starting" not in log.read_text()  # nothing queued: no worker, no GPU held
        enqueue(sample, redis_url, 20)  # 10 chunks
        finish(sample, redis_url, expected)  # the outputs equal the reference
        text = log.read_text()
        started = re.findall(r"autoscale: \d+ chunks waiting for (\d+) workers: starting (\S+) on (GPU \d)", text)
        assert 1 <= len(started) <= 2 and all(int(running) < 2 for running, _, _ in started), text
        assert len({device for _, _, device in started}) == len(started)  # never two on one device
        wait_for(lambda: log.read_text().count(" left, idle") == len(started), 60, "every worker to leave once idle")
        assert "exited with code" not in log.read_text() and "Traceback" not in log.read_text()
        assert sum(rows.values()) == 200 and len(rows) == len(started), rows  # every row, in the /metrics of the workers started
    finally:
        stop.set()
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    assert code == 0, log.read_text()
