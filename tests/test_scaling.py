"""Scaling: workers join and leave a running job; `worker up` pins one process per GPU or splits CPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import cli
from worker.broker import make_app
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


def child_env(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_worker_up_pins_one_process_per_gpu_and_splits_cpus(redis_url, model_files, tmp_path):
    for flags, expected in ((["--gpus", "0,1"], [("0", None), ("1", None)]), (["--cpus", "2"], [("-1", "1"), ("-1", "1")])):
        up = subprocess.Popen(
            [sys.executable, "-m", "worker", "up", *flags, "--broker", redis_url, "--checkpoint", str(model_files["checkpoint"]),
             "--data-root", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for(lambda: len(children(up.pid)) == 2, timeout=30, what="two workers")
            time.sleep(0.5)
            pids = sorted(children(up.pid))
            envs = [child_env(p) for p in pids]
            cmdlines = [open(f"/proc/{p}/cmdline").read().split("\0") for p in pids]
            got = sorted((e["CUDA_VISIBLE_DEVICES"], c[c.index("--threads") + 1] if "--threads" in c else None) for e, c in zip(envs, cmdlines))
            assert got == sorted(expected)
            if flags[0] == "--cpus":
                assert os.cpu_count() is None or int(got[0][1]) * 2 <= max(2, os.cpu_count())
            else:
                app = make_app(redis_url)
                wait_for(lambda: len(app.control.ping(timeout=0.5)) == 2, timeout=120, what="both GPU workers ready")
        finally:
            up.send_signal(signal.SIGTERM)
            output = up.communicate(timeout=120)[0]
        assert "exited with code" in output
        if flags[0] == "--gpus":  # no GPU here: each worker says so at start and runs on the CPU
            assert output.count("was asked for but none is visible: running on the CPU") == 2, output
