"""The job folder that producer, workers and finalizer share: job.json, model.json, shards/, failed/."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vggish_pipeline.core.files import create_json, write_json
from vggish_pipeline.core.shard import shard_name

JOB_FILE = "job.json"
MODEL_FILE = "model.json"


@dataclass(frozen=True)
class Failure:
    """A chunk a worker gave up on: its rows, why, and which worker (failed/START-STOP.json)."""

    start: int
    stop: int
    reason: str
    worker: str

    @classmethod
    def read(cls, path: Path) -> Failure | None:
        """The record at `path`; None for one that is unreadable or not a failure record."""
        try:
            record = json.loads(path.read_text())
            return cls(int(record["start"]), int(record["stop"]), str(record["reason"]), str(record["worker"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class JobDir:
    """Where each piece of a job's state lives on disk; the disk is the job's source of truth."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.job_file = path / JOB_FILE
        self.model_file = path / MODEL_FILE
        self.shards = path / "shards"
        self.failed = path / "failed"

    def ensure(self) -> None:
        self.shards.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(exist_ok=True)

    def shard_path(self, start: int, stop: int, digest: str, embedding: str) -> Path:
        return self.shards / shard_name(start, stop, digest, embedding)

    def pinned_model(self) -> str | None:
        try:
            return json.loads(self.model_file.read_text())["fingerprint"]
        except FileNotFoundError:
            return None

    def pin_model(self, fingerprint: str) -> str:
        """Pin the job to a model unless one is pinned already; return the job's model."""
        create_json(self.model_file, {"fingerprint": fingerprint})
        return self.pinned_model() or fingerprint

    def repin_model(self, fingerprint: str) -> bool:
        """Pin the job to `fingerprint`, dropping every shard of another model; True if shards were dropped."""
        old = self.pinned_model()
        if old == fingerprint:
            return False
        dropped = False
        if old is not None:
            for shard in self.shards.glob("*.npz"):
                shard.unlink()
                dropped = True
        write_json(self.model_file, {"fingerprint": fingerprint})
        return dropped

    def _failure_path(self, start: int, stop: int) -> Path:
        return self.failed / f"{start:012d}-{stop:012d}.json"

    def record_failure(self, failure: Failure) -> None:
        write_json(self._failure_path(failure.start, failure.stop), asdict(failure))

    def clear_failure(self, start: int, stop: int) -> None:
        self._failure_path(start, stop).unlink(missing_ok=True)

    def plans(self, job: str, source: str, start: int, stop: int, digest: str, embedding: str) -> bool:
        """Whether job.json plans exactly this chunk: only then may a refusal count as its failure
        (a stale or forged message must not poison the job)."""
        try:
            record = json.loads(self.job_file.read_text())
        except (OSError, ValueError):
            return False
        return (
            record.get("id") == job
            and record.get("source") == source
            and record.get("embedding") == embedding
            and [start, stop, digest] in record.get("chunks", [])
        )

    def failures(self) -> list[Failure]:
        if not self.failed.is_dir():
            return []
        return [f for f in map(Failure.read, sorted(self.failed.glob("*.json"))) if f is not None]
