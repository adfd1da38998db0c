"""Several machines, as README's "Several machines" runs them: a broker host (Redis, TLS only, an ACL
password), two worker hosts and the producer's host, each a network namespace on one LAN with the
data folder shared at the same path. Links are cut and restored during a job."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, acl_redis_server, merged_env, unavailable
from network import BROKER_ADDRESS, lan
from outputs import check_outputs
from pki import make_ca, make_server_cert, tls_redis

PORT = 6380  # docker-compose.tls.yml's
TILES = 30  # the 200-row sample, 30 times over: a job long enough to cut links in
CHUNK_ROWS = 100
CUT = 30  # seconds a worker host is cut off: longer than the broker's health checks (VGGISH_BROKER_TIMEOUT, 10 s)


@pytest.fixture
def cluster(tmp_path, sample_source, model_files):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        unavailable("network namespaces need root and iproute2 (CI runs as root)")
    binary = tls_redis()
    nfs, data, pki = tmp_path / "nfs", tmp_path / "data", tmp_path / "pki"
    for folder in (nfs, data, pki):
        folder.mkdir()
    spec = np.fromfile(sample_source / "wavfile_spec.dat")
    np.tile(spec, TILES).tofile(nfs / "wavfile_spec.dat")
    lines = (sample_source / "wavfile_df.csv").read_text().splitlines(keepends=True)
    body = [f"{i}{line[line.index(','):]}" for i, line in enumerate(lines[1:] * TILES)]
    (nfs / "wavfile_df.csv").write_text(lines[0] + "".join(body))
    shutil.copytree(model_files["dir"], nfs / "model")
    ca, other_ca = make_ca(pki, "ca"), make_ca(pki, "other-ca")
    cert, key = make_server_cert(pki, "ca", BROKER_ADDRESS)
    with lan(nfs, data) as net:
        for host in ("gpu1", "gpu2", "desk"):
            net.add(host)
        # Redis as docker-compose.tls.yml runs it on a broker host, here with TLS only, its files in pki/
        args = [a.replace("/tls/", f"{pki}/") for a in yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())["services"]["redis"]["command"]]
        args += ["--port", "0", "--bind", BROKER_ADDRESS, "--dir", str(pki)]
        on_broker = lambda *command: net.command("broker", *command)  # noqa: E731
        with acl_redis_server(binary, pki, PORT, *args, on=on_broker, address=BROKER_ADDRESS) as server:
            env = {"VGGISH_BROKER_URL": f"rediss://vggish@{BROKER_ADDRESS}:{PORT}/0", "VGGISH_BROKER_CA": str(ca),
                   "VGGISH_BROKER_PASSWORD_FILE": str(server["secret"]), "VGGISH_CHECKPOINT": str(data / "model" / model_files["checkpoint"].name)}
            yield {"net": net, "env": env, "data": data, "nfs": nfs, "logs": tmp_path, "other_ca": other_ca, "password": server["password"]}


def run_on(cluster: dict, host: str, *args: str, log: str | None = None, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`python -m ARGS` on HOST, in the cluster's environment (and `env`), output to LOG.log in the test's folder."""
    out = open(cluster["logs"] / f"{log or host}.log", "ab")
    try:
        return subprocess.Popen(cluster["net"].command(host, sys.executable, "-m", *args), env=merged_env({**cluster["env"], **(env or {})}),
                                stdout=out, stderr=subprocess.STDOUT, cwd=cwd or cluster["data"].parent)
    finally:
        out.close()


def log_of(cluster: dict, name: str) -> str:
    path = cluster["logs"] / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def until(condition, timeout: float, what: str) -> float:
    """Seconds until `condition()` holds; fails the test past `timeout`."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - began


def shards(folder: Path) -> list[Path]:
    return sorted((folder / "shards").glob("*.npz"))


def holding(log: str) -> int:
    """How many chunks the worker has taken and not finished (the one in its model, and the one it holds beside it)."""
    return log.count("] received") - log.count("] succeeded") - log.count("] raised")


def next_chunk(cluster: dict, host: str, timeout: float = 120) -> None:
    """Wait until HOST's worker takes a chunk it had not taken when this was called."""
    taken = log_of(cluster, host).count("] received")
    until(lambda: log_of(cluster, host).count("] received") > taken, timeout, f"{host} takes a chunk")


def finish(cluster: dict, host: str, *args: str, log: str) -> None:
    """`python -m ARGS` on HOST, which must end with exit 0 within two minutes."""
    assert run_on(cluster, host, *args, log=log).wait(120) == 0, log_of(cluster, log)


def freeze_holding_a_chunk(cluster: dict, host: str, proc: subprocess.Popen) -> int:
    """Cut HOST's link and freeze its worker in the middle of a chunk: a host gone with its work
    (here the shared folder does not go through the cut link, so a worker only cut off would still
    write its shard; frozen, it stands for one whose storage went with its link). Returns how many
    chunks it holds: the one in its model, and usually the one it keeps read beside it."""
    for _ in range(20):
        next_chunk(cluster, host)
        proc.send_signal(signal.SIGSTOP)
        cluster["net"].cut(host)
        time.sleep(0.5)  # a line written just before the stop is on disk by now
        if held := holding(log_of(cluster, host)):
            return held
        cluster["net"].restore(host)
        proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"{host} was never caught holding a chunk")


def stop_all(cluster: dict, procs: dict[str, subprocess.Popen], *logs: str) -> None:
    """Stop the workers (thawed first, killed if they will not go), and print the end of their logs and LOGS."""
    for proc in procs.values():
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for name in (*procs, *logs):
        print(f"----- {name}\n{log_of(cluster, name)[-3000:]}")


def test_a_job_across_hosts_survives_a_cut_link_on_each_side(cluster, expected):
    """gpu1 is cut off (and frozen) holding a chunk; the producer's link is cut while `wait`
    needs the broker to find that chunk; once back, `wait` re-sends it and gpu2 runs it; gpu1,
    back last, drops its own copy. Then gpu2's link is cut mid-job, longer than the broker's
    health checks (gpu1 paused meanwhile): it embeds again within a minute of the link coming
    back. Both jobs end with the reference outputs, one shard per chunk."""
    net, data, nfs = cluster["net"], cluster["data"], cluster["nfs"]
    reference = np.tile(expected["relu"], (TILES, 1))
    chunks = len(reference) // CHUNK_ROWS
    tls_flags = {"VGGISH_BROKER_URL": None, "VGGISH_BROKER_CA": None}  # gpu1 gets them as flags, gpu2 from the environment
    procs = {
        "gpu1": run_on(cluster, "gpu1", "worker", "start", "--broker", cluster["env"]["VGGISH_BROKER_URL"], "--broker-ca", cluster["env"]["VGGISH_BROKER_CA"],
                       "--cpu", "--threads", "1", "--name", "w@gpu1", "--data-root", str(data), env=tls_flags),
        "gpu2": run_on(cluster, "gpu2", "worker", "start", "--cpu", "--threads", "1", "--name", "w@gpu2", "--data-root", str(data)),
    }
    wrong = cluster["logs"] / "wrong_password"
    wrong.write_text("not-the-password\n")
    bad = {  # each stops a worker at start, on the worker's host, in one line
        "untrusted": {"VGGISH_BROKER_CA": str(cluster["other_ca"])},
        "password": {"VGGISH_BROKER_PASSWORD_FILE": str(wrong)},
        "closed": {"VGGISH_BROKER_URL": f"rediss://vggish@{BROKER_ADDRESS}:{PORT + 1}/0"},
    }
    refused = {case: run_on(cluster, "gpu2", "worker", "start", "--cpu", "--name", f"{case}@gpu2", "--data-root", str(data), log=case, env=env)
               for case, env in bad.items()}
    for case, says in (("untrusted", "certificate verify failed"), ("password", "invalid username-password"), ("closed", "refused")):
        assert refused[case].wait(120) == 3, log_of(cluster, case)
        said = log_of(cluster, case)  # the worker's own log lines, then its error
        errors = [line for line in said.splitlines() if line.startswith("worker: error:")]
        assert len(errors) == 1 and says in errors[0].lower() and "Traceback" not in said and cluster["password"] not in said, (case, said)
    try:
        until(lambda: all(" ready." in log_of(cluster, h) for h in procs), 180, "workers ready")
        finish(cluster, "desk", "producer", "enqueue", str(data / "wavfile_spec.dat"), "--chunk-rows", str(CHUNK_ROWS), log="enqueue")
        waiting = run_on(cluster, "desk", "producer", "wait", str(data), "--timeout", "600", log="wait")

        held = freeze_holding_a_chunk(cluster, "gpu1", procs["gpu1"])
        until(lambda: len(shards(nfs)) == chunks - held, 300, "gpu2 embeds all but gpu1's chunks")
        net.cut("desk")  # `wait` now asks the broker where the last chunk went, and gets no answer
        until(lambda: "broker unreachable" in log_of(cluster, "wait"), 60, "wait notices its link is gone")
        time.sleep(10)
        net.restore("desk")
        assert waiting.wait(180) == 0, log_of(cluster, "wait")
        assert f"re-sent {held} chunk{'s' * (held != 1)}" in log_of(cluster, "wait")
        net.restore("gpu1")
        procs["gpu1"].send_signal(signal.SIGCONT)
        back = until(lambda: "this copy is dropped" in log_of(cluster, "gpu1"), 60, "gpu1 drops its copy of the re-run chunk")
        print(f"gpu1 dropped its copy {back:.1f} s after its link was back")
        finish(cluster, "desk", "producer", "finalize", str(data), log="finalize")
        check_outputs(nfs, nfs / "wavfile_df.csv", reference)
        assert len(shards(nfs)) == chunks

        second = data / "again"
        finish(cluster, "desk", "producer", "enqueue", str(data / "wavfile_spec.dat"), "--out", str(second), "--chunk-rows", str(CHUNK_ROWS), log="enqueue")
        waiting = run_on(cluster, "desk", "producer", "wait", str(second), "--timeout", "600", log="wait2")
        next_chunk(cluster, "gpu2")
        net.cut("gpu2")
        procs["gpu1"].send_signal(signal.SIGSTOP)  # so that the rest of the job waits for gpu2, however fast this machine is
        time.sleep(CUT)
        net.restore("gpu2")
        embedded = log_of(cluster, "gpu2").count(" embedded in ")
        rejoined = until(lambda: log_of(cluster, "gpu2").count(" embedded in ") > embedded, 60, "gpu2 embeds again once its link is back")
        print(f"gpu2 embedded again {rejoined:.1f} s after its link was back")
        next_chunk(cluster, "gpu2", 60)
        net.cut("gpu2")  # and stopped while cut off: it leaves, its chunk's shard written, its ack left to the broker
        procs["gpu2"].terminate()
        began = time.monotonic()
        assert procs["gpu2"].wait(90) == 0, log_of(cluster, "gpu2")
        print(f"gpu2, stopped while cut off, left in {time.monotonic() - began:.1f} s")
        procs["gpu1"].send_signal(signal.SIGCONT)
        assert waiting.wait(300) == 0, log_of(cluster, "wait2")
        finish(cluster, "desk", "producer", "finalize", str(second), log="finalize")
        check_outputs(nfs / "again", nfs / "wavfile_df.csv", reference)
        assert len(shards(nfs / "again")) == chunks
        for host in procs:
            assert "Traceback" not in log_of(cluster, host), host
    finally:
        stop_all(cluster, procs, "wait", "wait2")


STORE_PORT = 9000
BUCKET = "vggish"
STORE_TILES = 10  # 2,000 rows, 20 chunks: enough to catch a worker holding one

@pytest.fixture
def bucket_cluster(tmp_path, sample_source, model_files):
    """The same LAN with no shared folder at all: the broker host also runs the store (moto's S3
    server, credentials enforced); the worker hosts and the producer's reach both over the LAN."""
    from store import moto_server

    if os.geteuid() != 0 or shutil.which("ip") is None:
        unavailable("network namespaces need root and iproute2 (CI runs as root)")
    from conftest import redis_binary

    redis = tmp_path / "redis"
    redis.mkdir()
    with lan() as net:
        for host in ("gpu1", "gpu2", "desk"):
            net.add(host)
            (tmp_path / host).mkdir()  # each host's own working folder and cache: nothing shared
        on_broker = lambda *command: net.command("broker", *command)  # noqa: E731
        args = ["--port", str(PORT), "--bind", BROKER_ADDRESS, "--dir", str(redis), "--save", "", "--appendonly", "no"]
        with acl_redis_server(redis_binary(), redis, PORT, *args, on=on_broker, address=BROKER_ADDRESS) as server, \
                moto_server(BROKER_ADDRESS, STORE_PORT, on=on_broker) as s3:
            env = {"VGGISH_BROKER_URL": f"redis://vggish@{BROKER_ADDRESS}:{PORT}/0", "VGGISH_BROKER_PASSWORD_FILE": str(server["secret"]),
                   "VGGISH_CHECKPOINT": f"s3://{BUCKET}/model/{model_files['checkpoint'].name}", **s3["env"]}
            cluster = {"net": net, "env": env, "data": tmp_path / "desk", "logs": tmp_path, "s3": s3}
            spec = np.fromfile(sample_source / "wavfile_spec.dat")
            np.tile(spec, STORE_TILES).tofile(tmp_path / "spec.dat")
            lines = (sample_source / "wavfile_df.csv").read_text().splitlines(keepends=True)
            (tmp_path / "df.csv").write_text(lines[0] + "".join(f"{i}{line[line.index(','):]}" for i, line in enumerate(lines[1:] * STORE_TILES)))
            on_store(cluster, f"fs.mkdir('{BUCKET}')\n"
                              f"fs.put_file('{tmp_path / 'spec.dat'}', '{BUCKET}/jobs/in/wavfile_spec.dat')\n"
                              f"fs.put_file('{tmp_path / 'df.csv'}', '{BUCKET}/jobs/in/wavfile_df.csv')\n"
                              f"fs.put_file('{model_files['checkpoint']}', '{BUCKET}/model/{model_files['checkpoint'].name}')")
            yield cluster


def on_store(cluster: dict, code: str) -> str:
    """Python run on the producer's host with an s3fs client `fs` of the store (the test's own host cannot reach it)."""
    script = "import json, s3fs\nfs = s3fs.S3FileSystem(use_listings_cache=False)\n" + code
    done = subprocess.run(cluster["net"].command("desk", sys.executable, "-c", script), env=merged_env(cluster["env"]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def stored_shards(cluster: dict, job: str) -> int:
    return int(on_store(cluster, f"print(len(fs.ls('{BUCKET}/{job}/shards')) if fs.exists('{BUCKET}/{job}/shards') else 0)"))


def test_a_job_across_hosts_that_share_no_folder_runs_from_a_bucket_and_survives_a_cut_link(bucket_cluster, expected, tmp_path):
    """Inputs, checkpoint, job folder and outputs in a bucket; the worker hosts are given only its
    prefix. gpu1 is cut off (and frozen) holding a chunk: `wait` re-sends it, gpu2 runs it, and gpu1,
    back, drops its own copy (a conditional PUT: the first shard stays). The outputs equal the
    reference, one shard per chunk."""
    cluster = bucket_cluster
    reference = np.tile(expected["relu"], (STORE_TILES, 1))
    chunks = len(reference) // CHUNK_ROWS
    job = f"s3://{BUCKET}/jobs/a"
    procs = {
        host: run_on(cluster, host, "worker", "start", "--cpu", "--threads", "1", "--name", f"w@{host}", "--data-root", f"s3://{BUCKET}/jobs",
                     env={"VGGISH_CACHE_DIR": str(tmp_path / host / "cache")}, cwd=tmp_path / host)
        for host in ("gpu1", "gpu2")
    }
    try:
        until(lambda: all(" ready." in log_of(cluster, h) for h in procs), 180, "workers ready")
        finish(cluster, "desk", "producer", "enqueue", f"s3://{BUCKET}/jobs/in/wavfile_spec.dat", "--out", job,
               "--chunk-rows", str(CHUNK_ROWS), log="enqueue")
        waiting = run_on(cluster, "desk", "producer", "wait", job, "--timeout", "600", log="wait")
        held = freeze_holding_a_chunk(cluster, "gpu1", procs["gpu1"])
        assert waiting.wait(300) == 0, log_of(cluster, "wait")
        assert f"re-sent {held} chunk{'s' * (held != 1)}" in log_of(cluster, "wait")
        cluster["net"].restore("gpu1")
        procs["gpu1"].send_signal(signal.SIGCONT)
        until(lambda: "this copy is dropped" in log_of(cluster, "gpu1") or "shard exists, skipped" in log_of(cluster, "gpu1"), 120,
              "gpu1 leaves the re-run chunk's shard as it is")
        finish(cluster, "desk", "producer", "finalize", job, log="finalize")
        got = tmp_path / "got"
        got.mkdir()
        on_store(cluster, "".join(f"fs.get_file('{BUCKET}/jobs/a/{name}', '{got / name}')\n" for name in ("wavfile_embed.dat", "wavfile_embed.csv")))
        check_outputs(got, tmp_path / "df.csv", reference)
        assert stored_shards(cluster, "jobs/a") == chunks
        for host in procs:
            assert "Traceback" not in log_of(cluster, host), host
            assert list((tmp_path / host).iterdir()) == [tmp_path / host / "cache"], host  # a worker host wrote only its cache
    finally:
        stop_all(cluster, procs, "wait")
