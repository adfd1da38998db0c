"""A fleet of `worker start` processes on this machine: one per GPU or MIG slice, or N CPU workers sharing the cores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.devices import Device, threads_per_worker
from worker.errors import PipelineError


@dataclass
class Member:
    name: str
    args: list[str]
    env: dict[str, str]
    device: Device | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None

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


@dataclass
class Fleet:
    members: list[Member]
    log_dir: Path | None = None
    reported: set[str] = field(default_factory=set)
    stopping: bool = False

    @classmethod
    def plan(cls, gpus: list[Device], cpus: int, common: list[str], prefix: str = "", log_dir: Path | None = None) -> "Fleet":
        """One member per device in `gpus`, pinned by its UUID; else `cpus` CPU members."""
        host = socket.gethostname()
        members = []
        for gpu in gpus:
            name = f"{prefix}{gpu.short}@{host}"
            members.append(Member(name, ["--gpu", gpu.uuid, "--name", name, *common], gpu.env(), gpu))
        if not gpus:
            threads = threads_per_worker(cpus)
            for i in range(cpus):
                name = f"{prefix}cpu{i}@{host}"
                args = ["--cpu", "--threads", str(threads), "--name", name, *common]
                members.append(Member(name, args, {"CUDA_VISIBLE_DEVICES": "-1"}))
        return cls(members, log_dir)

    def summary(self) -> str:
        """'2 local workers: local-gpu0 on GPU 0 … (GPU-…), …' for the line a run starts with."""
        n = len(self.members)
        return f"{n} local worker{'s' * (n != 1)}: " + ", ".join(f"{m.name.split('@')[0]} on {m.where()}" for m in self.members)

    def start(self) -> "Fleet":
        for m in self.members:
            command = [sys.executable, "-m", "worker", "start", *m.args]
            env = {**os.environ, **m.env}
            if self.log_dir is None:
                m.proc = subprocess.Popen(command, env=env)
                continue
            self.log_dir.mkdir(parents=True, exist_ok=True)
            m.log = self.log_dir / f"{m.name.split('@')[0]}.log"
            with open(m.log, "wb") as log:
                m.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def dead(self) -> list[Member]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is not None]

    def report_deaths(self, out=sys.stderr) -> None:
        for m in self.dead():
            if m.name not in self.reported:
                self.reported.add(m.name)
                out.write(f"\nworker {m.name} exited with code {m.proc.returncode}\n")

    def check(self, report: bool = True) -> None:
        """Raise if every member has died; one death is survivable (its chunk is re-sent), and reported
        unless `report` is off (while starting, when all may fail at once for the same reason)."""
        if self.members and len(self.dead()) == len(self.members):
            last = ""
            if self.members[0].log:
                lines = self.members[0].log.read_text(errors="replace").strip().splitlines()
                last = lines[-1] if lines else ""
            raise PipelineError(f"all workers exited; {self.members[0].name} said: {last or '(nothing)'}")
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
