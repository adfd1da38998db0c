"""A fleet of `worker start` processes on this machine: one per GPU or MIG slice, or N CPU workers sharing the cores."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vggish_pipeline.core.devices import MEMORY_GROWTH_ENV, Device, threads_per_worker
from vggish_pipeline.core.errors import WorkersDied
from vggish_pipeline.core.settings import METRICS_ENV


@dataclass
class Member:
    name: str
    args: list[str]
    env: dict[str, str]
    device: Device | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None
    deaths: list[float] = field(default_factory=list)  # when it died, for the restart limit

    def last_words(self) -> str:
        """Its own error line (`worker: error: …`), else its last ERROR line, else its last line."""
        if self.log is None or not self.log.exists():
            return "(no log)"
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        for wanted in (lambda line: line.startswith("worker: error:"), lambda line: " ERROR " in line or " CRITICAL " in line):
            found = [line for line in lines if wanted(line)]
            if found:
                return found[-1]
        return lines[-1] if lines else "(nothing)"

    def exit_code(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def where(self) -> str:
        return self.device.describe() if self.device else "CPU"

    def describe(self) -> dict:
        """What started: for summaries and --json."""
        d = self.device
        return {
            "name": self.name,
            "device": d.describe() if d else "CPU",
            "index": d.index if d else None,
            "uuid": d.uuid if d else None,
            "cpus": list(d.cpus) if d else None,
            "pid": self.proc.pid if self.proc else None,
        }


PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAX_RESTARTS = 3  # of one local worker within RESTART_WINDOW; one more death stops the command
RESTART_WINDOW = 600.0


def exit_with_parent(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` after which the child gets `sig` when this process dies, however it dies
    (kill -9, OOM, a dropped session): Linux's PR_SET_PDEATHSIG. None where there is no such call."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


@dataclass
class Fleet:
    """Members get `death_signal` if the process that started them dies: SIGTERM (a warm stop)
    where the broker outlives it, SIGKILL where it dies too (a private Redis)."""

    members: list[Member]
    log_dir: Path | None = None
    reported: set[str] = field(default_factory=set)
    stopping: bool = False
    death_signal: int = signal.SIGTERM
    needs: list[Callable[[TextIO], None]] = field(default_factory=list)  # revivers of what the members need (a private Redis)

    @classmethod
    def plan(
        cls,
        gpus: list[Device],
        cpus: int,
        common: list[str],
        env: dict[str, str] | None = None,
        prefix: str = "",
        log_dir: Path | None = None,
        death_signal: int = signal.SIGTERM,
        metrics_port: int | None = None,
    ) -> Fleet:
        """One member per device in `gpus`, pinned by its UUID; else `cpus` CPU members; each gets
        `common` arguments and `env` (for secrets, which a command line would show to `ps`), and
        with `metrics_port` its own port for /metrics: that one, the next, and so on (and none
        without: a VGGISH_METRICS_PORT this process has is not theirs to share)."""
        env = {**(env or {}), METRICS_ENV: ""}
        host = socket.gethostname()
        members = []
        for gpu in gpus:
            name = f"{prefix}{gpu.short}@{host}"
            members.append(Member(name, ["--gpu", gpu.uuid, "--name", name, *common], {**env, **gpu.env()}, gpu))
        if not gpus:
            threads = threads_per_worker(cpus)
            for i in range(cpus):
                name = f"{prefix}cpu{i}@{host}"
                args = ["--cpu", "--threads", str(threads), "--name", name, *common]
                members.append(Member(name, args, {**env, "CUDA_VISIBLE_DEVICES": "-1"}))
        if metrics_port is not None:
            for i, m in enumerate(members):
                m.args += ["--metrics-port", str(metrics_port + i)]
        return cls(members, log_dir, death_signal=death_signal)

    def summary(self) -> str:
        """'2 local workers: local-gpu0 on GPU 0 … (GPU-…), …' for the line a run starts with."""
        n = len(self.members)
        return f"{n} local worker{'s' * (n != 1)}: " + ", ".join(f"{m.name.split('@')[0]} on {m.where()}" for m in self.members)

    def start(self) -> Fleet:
        for m in self.members:
            self.spawn(m)
        return self

    def spawn(self, m: Member, again: bool = False) -> None:
        """Start `m` (again: its log goes on)."""
        command = [sys.executable, "-m", "worker", "start", *m.args]
        env = {MEMORY_GROWTH_ENV: "true", **os.environ, **m.env}  # set before its TensorFlow loads, unless the user set it
        arm = exit_with_parent(self.death_signal)
        if self.log_dir is None:
            m.proc = subprocess.Popen(command, env=env, preexec_fn=arm)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        m.log = self.log_dir / f"{m.name.split('@')[0]}.log"
        with open(m.log, "ab" if again else "wb") as log:
            m.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=arm)

    def revive(self, out=sys.stderr) -> None:
        """Start again each member that died, saying so in one line, unless it died more than
        MAX_RESTARTS times in RESTART_WINDOW seconds: then raise WorkersDied with its own error."""
        if self.stopping:
            return
        self.revive_needs(out)
        now = time.monotonic()
        for m in self.dead():
            m.deaths = [t for t in m.deaths if now - t < RESTART_WINDOW] + [now]
            said = m.last_words()
            if len(m.deaths) > MAX_RESTARTS:
                raise WorkersDied(f"worker {m.name} died {len(m.deaths)} times in {RESTART_WINDOW / 60:g} minutes; it said: {said}")
            out.write(f"\nworker {m.name} exited with code {m.exit_code()} ({said}); starting it again\n")
            self.spawn(m, again=True)

    def revive_needs(self, out=sys.stderr) -> None:
        """Start again what the members need, if it died (a private Redis)."""
        for revive_need in self.needs:
            revive_need(out)

    def dead(self) -> list[Member]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is not None]

    def report_deaths(self, out: TextIO | None = None) -> None:
        out = out or sys.stderr
        for m in self.dead():
            if m.name not in self.reported:
                self.reported.add(m.name)
                out.write(f"\nworker {m.name} exited with code {m.exit_code()}\n")

    def check(self, report: bool = True) -> None:
        """Raise if every member has died; one death is survivable (its chunk is re-sent), and reported
        unless `report` is off (while starting, when all may fail at once for the same reason)."""
        if self.members and len(self.dead()) == len(self.members):
            # Before any was ready, that is the setup's fault (a checkpoint, a GPU), not the job's: exit 3.
            raise WorkersDied(f"all workers exited; {self.members[0].name} said: {self.members[0].last_words()}", at_start=not report)
        if report:
            self.report_deaths()

    def signal(self, sig: int) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(sig)

    def signal_stop(self) -> None:
        """Ask every member for a warm stop (SIGTERM: finish the current chunk, then exit), once."""
        if not self.stopping:
            self.stopping = True
            self.signal(signal.SIGTERM)

    def stop(self, timeout: float = 120.0) -> None:
        """Warm stop, waiting for each member, then kill what lingers."""
        self.signal_stop()
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
