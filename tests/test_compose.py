"""docker-compose.yml keeps its promises: its config is checked without a Docker engine, and the
Redis it runs (scripts/redis-with-acl: an ACL user with the least rights, a password from a file)
carries a real job, with real workers, through a killed worker, with the password never in sight."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, acl_redis_server, cli, free_port, merged_env, redis_binary, unavailable
from outputs import check_outputs


def compose(*files: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`docker-compose config` on FILES (default docker-compose.yml), without a Docker engine."""
    if not shutil.which("docker-compose"):
        unavailable("docker-compose is not installed")
    args = [a for f in files or ("docker-compose.yml",) for a in ("-f", str(ROOT / f))]
    return subprocess.run(["docker-compose", *args, "config"], capture_output=True, text=True, env=merged_env(env))


def compose_config(*files: str, env: dict | None = None) -> dict:
    """What docker-compose makes of FILES."""
    result = compose(*files, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_pins_one_gpu_per_worker_and_waits_for_a_healthy_redis_whose_password_is_a_secret():
    config = compose_config()
    services = config["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "noeviction" in redis["command"]
    assert redis["entrypoint"][-1] == "/usr/local/bin/redis-with-acl"
    assert any(v.startswith(f"{ROOT}/scripts/redis-with-acl:") for v in redis["volumes"])
    assert "redis-cli --user vggish" in redis["healthcheck"]["test"][1] and "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    assert all(str(p.get("host_ip", p) if isinstance(p, dict) else p).startswith("127.0.0.1") for p in redis["ports"])
    assert config["secrets"]["redis_password"]["file"].endswith("/secrets/redis_password")

    workers = {k: v for k, v in services.items() if k.startswith("worker-gpu")}
    ids = [v["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for v in workers.values()]
    assert sorted(ids) == [["0"], ["1"]]
    assert sorted(v["environment"]["VGGISH_WORKER_NAME"] for v in workers.values()) == ["gpu0@compose", "gpu1@compose"]
    assert all(v["healthcheck"]["test"] == ["CMD", "worker", "ping"] for v in workers.values())
    for name, service in services.items():
        if name == "redis":
            continue
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        env = service["environment"]
        assert env["VGGISH_BROKER_URL"] == "redis://vggish@redis:6379/0", name  # no password in the URL
        assert env["VGGISH_BROKER_PASSWORD_FILE"] == "/run/secrets/redis_password", name
        assert [s["source"] for s in service["secrets"]] == ["redis_password"], name
    assert "+@all" not in (ROOT / "scripts" / "redis-with-acl").read_text()


def test_a_worker_only_host_joins_a_remote_tls_broker_under_its_own_names():
    """docker-compose.worker.yml (README "Several machines"): no Redis of its own, the broker's URL,
    CA and password from outside, the data folder at /data, worker names that say the host; and
    docker-compose.tls.yml, which opens Redis' TLS port on the broker host."""
    env = {"VGGISH_BROKER_URL": "rediss://vggish@broker-host:6380/0", "VGGISH_HOST": "node7", "VGGISH_DATA": "/mnt/nfs/vggish"}
    services = compose_config("docker-compose.worker.yml", env=env)["services"]
    assert sorted(services) == ["worker-gpu0", "worker-gpu1"]
    for name, service in services.items():
        assert "depends_on" not in service, name
        assert {k: service["environment"][k] for k in ("VGGISH_BROKER_URL", "VGGISH_BROKER_CA", "VGGISH_BROKER_PASSWORD_FILE", "VGGISH_DATA_ROOTS")} == {
            "VGGISH_BROKER_URL": env["VGGISH_BROKER_URL"], "VGGISH_BROKER_CA": "/run/secrets/broker_ca",
            "VGGISH_BROKER_PASSWORD_FILE": "/run/secrets/redis_password", "VGGISH_DATA_ROOTS": "/data"}, name
        assert service["environment"]["VGGISH_WORKER_NAME"] == f"{name.removeprefix('worker-')}@node7"
        assert "/mnt/nfs/vggish:/data:rw" in service["volumes"], name
    for missing in ("VGGISH_BROKER_URL", "VGGISH_HOST"):  # no default broker, and no name shared by two hosts
        refused = compose("docker-compose.worker.yml", env={**env, missing: None})
        assert refused.returncode != 0 and f"set {missing}" in refused.stderr, missing

    redis = compose_config("docker-compose.yml", "docker-compose.tls.yml")["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--tls-port") + 1] == "6380" and command[command.index("--tls-auth-clients") + 1] == "no"
    assert "--appendonly" in command and "noeviction" in command  # the override keeps what the base file promised
    assert any(isinstance(p, dict) and p["target"] == 6380 for p in redis["ports"])


@pytest.fixture
def acl_redis(tmp_path):
    """scripts/redis-with-acl, as docker-compose runs it, on a real redis-server on 127.0.0.1."""
    binary = redis_binary()
    if binary is None:
        unavailable("no redis-server")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    with acl_redis_server(binary, tmp_path, port, *args) as server:
        yield {**server, "port": port}


def test_the_acl_user_carries_a_job_through_a_killed_worker_and_can_do_nothing_else(acl_redis, sample, model_files, expected, tmp_path):
    import redis

    password, port = acl_redis["password"], acl_redis["port"]
    assert password not in (tmp_path / "users.acl").read_text()  # only its SHA-256
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()  # the default user is off
    client = redis.Redis(port=port, username="vggish", password=password)
    for command in (["FLUSHALL"], ["CONFIG", "GET", "*"], ["KEYS", "*"], ["DEBUG", "SLEEP", "0"], ["ACL", "LIST"], ["SHUTDOWN"]):
        # Redis 7 refuses DEBUG to everyone by default (enable-debug-command), before the ACL is asked
        refusal = redis.exceptions.ResponseError if command[0] == "DEBUG" else redis.exceptions.NoPermissionError
        with pytest.raises(refusal, match="not allowed|no permissions"):
            client.execute_command(*command)

    env = {
        "VGGISH_BROKER_URL": f"redis://vggish@127.0.0.1:{port}/0",  # the password comes from the file only
        "VGGISH_BROKER_PASSWORD_FILE": str(acl_redis["secret"]),
        "VGGISH_CHECKPOINT": str(model_files["checkpoint"]),
    }
    host = socket.gethostname()
    up = subprocess.Popen(
        [sys.executable, "-m", "worker", "up", "--cpus", "2", "--data-root", str(sample["dir"])],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "up.log", "wb"), start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while cli("worker", "ping", f"cpu1@{host}", env=env).returncode != 0:
            assert time.monotonic() < deadline and up.poll() is None, (tmp_path / "up.log").read_text()
        pids = [acl_redis["pid"], up.pid, *map(int, subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split())]
        assert len(pids) == 4
        for pid in pids:  # neither `ps` nor a look at the environment shows the password
            for view in ("cmdline", "environ"):
                assert password.encode() not in Path(f"/proc/{pid}/{view}").read_bytes(), (pid, view)

        enqueued = cli("producer", "enqueue", str(sample["spec"]), "--chunk-rows", "20", env=env)
        assert enqueued.returncode == 0, enqueued.stderr
        shards = sample["dir"] / "shards"
        while not any(shards.glob("*.npz")) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = cli("worker", "ping", f"cpu1@{host}", env=env)
        os.kill(pids[-1], signal.SIGKILL)  # a worker lost mid-job: its chunk must come back through the ACL'd broker
        assert killed.returncode == 0
        waited = cli("producer", "wait", str(sample["dir"]), env=env, timeout=300)
        assert waited.returncode == 0, waited.stderr
        finalized = cli("producer", "finalize", str(sample["dir"]))
        assert finalized.returncode == 0, finalized.stderr
        check_outputs(sample["dir"], sample["csv"], expected["relu"])

        down = cli("worker", "down", f"cpu0@{host}", env=env)
        assert down.returncode == 0, down.stderr
        up.wait(60)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    refused = cli("producer", "status", str(sample["dir"]), env={**env, "VGGISH_BROKER_PASSWORD_FILE": str(wrong)})
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1 and "invalid username-password" in refused.stderr and "not-the-password" not in refused.stderr
