"""Workers that follow the broker's backlog on one machine: `worker up --autoscale MIN:MAX`, `producer watch --autoscale`.

Every second it looks at the backlog (core.broker.backlog: queued chunks, and those delivered
and not yet acknowledged) and the workers running. While the backlog is more than
`per_worker` chunks for each running worker (or fewer than MIN run), it starts one more on a
device none runs on, at most one every `start_every` seconds, up to MAX. Workers started beyond
MIN are started with `--exit-when-idle IDLE`: each leaves by itself (a warm stop, exit 0) once no
chunk has come for IDLE seconds, so with MIN 0 no process holds a GPU while nothing is queued,
and the next chunk brings one back. One line per change. A worker that dies (non-zero) is
started again only when the backlog asks; more than MAX_RESTARTS deaths in RESTART_WINDOW stop it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vggish_pipeline.core import broker
from vggish_pipeline.core.errors import UsageError, WorkersDied
from vggish_pipeline.core.fleet import MAX_RESTARTS, RESTART_WINDOW, Fleet, Member

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

PER_WORKER = 2  # chunks of backlog a running worker is left with before another starts
START_EVERY = 2.0  # seconds between two starts at most


def scale_range(text: str, devices: int) -> tuple[int, int]:
    """MIN:MAX from --autoscale, checked against the devices there are."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--autoscale {text!r}: expected MIN:MAX, e.g. 0:4") from None
    if not 0 <= low <= high or high < 1:
        raise UsageError(f"--autoscale {text}: expected 0 <= MIN <= MAX and MAX >= 1")
    if high > devices:
        raise UsageError(f"--autoscale {text}: MAX is more than the {devices} devices given")
    return low, high


@dataclass
class Autoscaler:
    fleet: Fleet
    app: Celery
    low: int
    high: int
    idle: float
    per_worker: int = PER_WORKER
    start_every: float = START_EVERY
    last_start: float = float("-inf")
    base_args: dict[str, list[str]] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)  # members whose exit was said
    say: Callable[[str], None] = log.info  # where its one line per change goes

    def running(self) -> list[Member]:
        return [m for m in self.fleet.members if m.proc is not None and m.proc.poll() is None]

    def step(self) -> None:
        """One look: say who left, and start one worker if the backlog asks for it."""
        now = time.monotonic()
        for m in self.fleet.members:
            if m.proc is not None and m.proc.poll() is not None and m.name not in self.left:
                self.left.add(m.name)
                code = m.exit_code()
                if code:
                    m.deaths = [t for t in m.deaths if now - t < RESTART_WINDOW] + [now]
                    if len(m.deaths) > MAX_RESTARTS:
                        raise WorkersDied(f"worker {m.name} died {len(m.deaths)} times in {RESTART_WINDOW / 60:g} minutes; "
                                          f"it said: {m.last_words()}")
                    self.say(f"autoscale: {m.name} exited with code {code} ({m.last_words()})")
                else:
                    self.say(f"autoscale: {m.name} left, idle ({len(self.running())} running)")
        running = self.running()
        if len(running) >= self.high or now - self.last_start < self.start_every:
            return
        try:
            waiting = broker.backlog(self.app).chunks
        except broker.outage_errors() as e:
            self.say(f"autoscale: cannot read the backlog ({e}); looking again")
            return
        if len(running) >= self.low and waiting <= self.per_worker * len(running):
            return
        free = [m for m in self.fleet.members if m not in running]
        member = free[0]
        extra = len(running) >= self.low  # beyond MIN: it leaves when idle
        base = self.base_args.setdefault(member.name, list(member.args))
        member.args = [*base, *(["--exit-when-idle", f"{self.idle:g}"] if extra else [])]
        self.left.discard(member.name)
        self.fleet.spawn(member, again=member.proc is not None)
        self.last_start = now
        leaves = f" (leaves after {self.idle:g} s idle)" if extra else ""
        self.say(f"autoscale: {waiting} chunks waiting for {len(running)} workers: starting {member.name} on {member.where()}{leaves}")
