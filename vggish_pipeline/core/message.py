"""What crosses the broker: the one message a producer sends per chunk (a reference to rows of a
file, never the data), and what a worker answers when asked about itself.

The chunk message travels as the keyword arguments of the Celery task TASK_NAME, JSON-encoded,
on QUEUE. A producer in another language can enqueue by sending a Celery protocol-2 message with
these kwargs (see README, "Message"). The answer is the remote-control reply INFO_COMMAND.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from vggish_pipeline.core.spectrogram import DIGESTS, OLD_DIGEST

TASK_NAME = "vggish.embed_chunk"
QUEUE = "vggish"
SCHEMA = 1
EMBEDDING_FORMS = ("relu", "linear")
DEFAULT_EMBEDDING = "relu"  # the seed notebook's form
INFO_COMMAND = "vggish_info"


class MessageError(ValueError):
    """A message that does not follow the schema."""


@dataclass(frozen=True)
class ChunkMessage:
    """Embed rows [start, stop) of `source` into a shard under `out_dir`."""

    job: str
    out_dir: str
    source: str
    start: int
    stop: int
    digest: str
    embedding: str
    schema: int = SCHEMA
    digest_scheme: str = OLD_DIGEST  # how `digest` was taken; producers that name none used blake2b-128

    def encode(self) -> dict:
        return asdict(self)

    @classmethod
    def decode(cls, payload: dict) -> ChunkMessage:
        if not isinstance(payload, dict):
            raise MessageError("message is not a JSON object")
        names = {f.name for f in fields(cls)}
        missing = names - set(payload) - {"schema", "digest_scheme"}
        if missing:
            raise MessageError(f"message lacks {sorted(missing)}")
        unknown = set(payload) - names
        if unknown:
            raise MessageError(f"message has unknown fields {sorted(unknown)}")
        msg = cls(**payload)
        for name in ("job", "out_dir", "source", "digest", "embedding", "digest_scheme"):
            if not isinstance(getattr(msg, name), str):
                raise MessageError(f"message field {name} must be a string")
        for name in ("start", "stop", "schema"):
            value = getattr(msg, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise MessageError(f"message field {name} must be an integer")
        if msg.schema != SCHEMA:
            raise MessageError(f"message schema {msg.schema} is not {SCHEMA}")
        if not 0 <= msg.start < msg.stop:
            raise MessageError(f"message row range {msg.start}-{msg.stop} is empty or negative")
        if msg.digest_scheme not in DIGESTS:
            raise MessageError(f"message digest_scheme {msg.digest_scheme!r} is not one of {sorted(DIGESTS)}")
        if msg.embedding not in EMBEDDING_FORMS:
            raise MessageError(f"message embedding {msg.embedding!r} is not one of {EMBEDDING_FORMS}")
        return msg


@dataclass
class Throughput:
    """Chunks and rows embedded, and the seconds they took: a worker's, or its part in one job."""

    chunks: int = 0
    rows: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float | None:
        return round(self.rows / self.seconds, 1) if self.seconds else None

    def to_dict(self) -> dict:
        """For `status --json`: the fields (seconds to 0.01 s) and rows_per_s."""
        return {**asdict(self), "seconds": round(self.seconds, 2), "rows_per_s": self.rows_per_s}


@dataclass(kw_only=True)
class WorkerInfo(Throughput):
    """A worker about itself (remote control INFO_COMMAND, `producer status`): device, model, throughput."""

    device: str  # what TensorFlow runs on
    pinned: str | None = None  # the GPU or MIG slice the worker was pinned to, if any
    model: str

    def encode(self) -> dict:
        return asdict(self)

    @classmethod
    def decode(cls, reply: dict) -> WorkerInfo | None:
        """The reply as sent, or None for one that is not a worker's of this project (another app's)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(reply, dict) or not {"device", "model"} <= set(reply):
            return None
        return cls(**{k: v for k, v in reply.items() if k in names})
