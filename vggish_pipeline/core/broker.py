"""The Celery app both sides share: JSON only, late acks, one chunk in flight per worker."""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from vggish_pipeline.core.errors import BrokerError, UsageError, os_error_line, redact
from vggish_pipeline.core.message import INFO_COMMAND, QUEUE, WorkerInfo
from vggish_pipeline.core.settings import BROKER_ENV, CERT_ENV, KEY_ENV, PASSWORD_FILE_ENV, Settings

if TYPE_CHECKING:
    from celery import Celery

def given_url(settings: Settings) -> str | None:
    """--broker, else VGGISH_BROKER_URL; the password from VGGISH_BROKER_PASSWORD_FILE goes in here,
    so it never has to sit in a command line or an environment that `ps`/`docker inspect` show."""
    url = settings.broker_url
    if not url or settings.password_file is None:
        return url
    try:
        password = settings.password_file.read_text().rstrip("\r\n")
    except OSError as e:
        raise BrokerError(f"cannot read the broker password ({PASSWORD_FILE_ENV}): {os_error_line(e)}") from e
    parts = urlsplit(url)
    if parts.password is not None:
        raise BrokerError(f"{redact(url)} has a password and {PASSWORD_FILE_ENV} gives another: give one")
    user = quote(unquote(parts.username or ""), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"))


def broker_url(settings: Settings) -> str:
    url = given_url(settings)
    if not url:
        raise BrokerError(f"no broker: pass --broker URL or set {BROKER_ENV} (e.g. redis://:PASSWORD@host:6379/0)")
    return url


def optional_app(settings: Settings) -> Celery | None:
    """The app for --broker or the environment's broker, or None where neither names one."""
    url = given_url(settings)
    return make_app(url, settings) if url else None


def tls_options(url: str, settings: Settings) -> dict | None:
    """Celery's broker_use_ssl for a rediss:// URL: the server's certificate is always checked
    (against --broker-ca, else the system's CAs), and a client certificate given is presented."""
    files = (settings.broker_ca, settings.broker_cert, settings.broker_key)
    if not url.startswith("rediss://"):
        if any(files) and url.startswith("redis://"):
            raise UsageError(f"TLS files are given but {redact(url)} is not a rediss:// URL")
        return None
    if (settings.broker_cert is None) != (settings.broker_key is None):
        raise UsageError(f"a client certificate needs both {CERT_ENV} (--broker-cert) and {KEY_ENV} (--broker-key)")
    for path in files:
        if path is not None and not path.is_file():
            raise UsageError(f"{path}: no such TLS file")
    return {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(settings.broker_ca) if settings.broker_ca else None,
        "ssl_certfile": str(settings.broker_cert) if settings.broker_cert else None,
        "ssl_keyfile": str(settings.broker_key) if settings.broker_key else None,
    }


def transport_options(settings: Settings) -> dict:
    """How long a silent broker is waited for. A link that drops packets without a word (a cable
    pulled, a switch port down) leaves TCP waiting for many minutes: any command (an ack, a publish,
    the producer's checks) gives up after `broker_timeout` instead, a connection attempt too, and a
    worker whose idle BRPOP stays unanswered that long past its own timeout drops it (kombu's health
    check); each then reconnects (Celery retries after 2, 4, 6… s, at most 30 s apart)."""
    timeout = settings.broker_timeout
    return {
        "visibility_timeout": settings.visibility_timeout,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": max(1, round(timeout)),
        "socket_keepalive": True,
    }


def make_app(url: str, settings: Settings) -> Celery:
    from celery import Celery  # here, so a worker can read its URL before Celery loads (see worker.cli)


    app = Celery("vggish", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=QUEUE,
        worker_prefetch_multiplier=1,
        # A task keeps going when the broker goes away: the threads pool cannot cancel one (Celery logs
        # tracebacks trying), and its shard is written once under its name whoever finishes it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings),
        broker_use_ssl=tls_options(url, settings),
        worker_hijack_root_logger=True,
    )
    return app


def check_connection(app: Celery) -> None:
    """Fail now, with the URL (password hidden), if the broker cannot be reached."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
    except Exception as e:
        raise BrokerError(f"cannot reach broker {redact(app.conf.broker_url)}: {e}") from e


def poll_briefly(app: Celery) -> None:
    """Let an idle worker's blocking pop return every 0.1 s instead of kombu's 1 s.

    A warm stop closes the consumer only once the pop in flight has returned, so an idle worker
    otherwise takes up to a second to leave. Redis before 6.0 takes whole seconds only: keep 1 s there.
    """
    from redis.exceptions import NoPermissionError

    with app.connection_for_write() as conn:
        try:
            version = conn.default_channel.client.info("server").get("redis_version", "0")
        except NoPermissionError:  # an ACL without INFO (docker-compose's): ACLs came with Redis 6
            version = "6"
    if int(version.split(".")[0]) >= 6:
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, "polling_interval": 0.1}


def live_workers(app: Celery, timeout: float = 1.0) -> dict[str, WorkerInfo]:
    """Every worker answering now, by name: its device, model, chunks, rows and rows/s."""
    workers = {}
    for reply in app.control.broadcast(INFO_COMMAND, reply=True, timeout=timeout) or []:
        for name, answer in reply.items():
            info = WorkerInfo.decode(answer)
            if info is not None:
                workers[name] = info
    return workers


def outage_errors() -> tuple[type[Exception], ...]:
    """What a broker that is down or out of reach raises through kombu and redis-py (a refused or
    reset connection, a timeout, a server still loading): the errors a loop may wait out and retry.
    Anything else, an ACL refusal included, is not an outage."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    return (OSError, OperationalError, RedisConnectionError, RedisTimeout)


PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: a queue's other priorities are lists named QUEUE + this + N
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged messages, by delivery tag


@dataclass(frozen=True)
class Backlog:
    """The chunks that still need a worker: queued, plus delivered and not yet acknowledged (in a
    worker's model, held beside it, or with a worker that died, until the visibility timeout gives
    it to another), and their rows. The queue's length alone reads near 0 on a busy fleet: with
    prefetch, every chunk a worker holds has left the list."""

    queued: int = 0
    unacked: int = 0
    rows: int = 0

    @property
    def chunks(self) -> int:
        return self.queued + self.unacked

    def to_dict(self) -> dict:
        return {"chunks": self.chunks, "queued": self.queued, "unacked": self.unacked, "rows": self.rows}


def message_rows(raw: bytes | str) -> int:
    """The rows a queued Celery message on QUEUE asks for (0 if it is not a chunk message)."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        kwargs = json.loads(body)[1]
        return max(0, int(kwargs["stop"]) - int(kwargs["start"]))
    except (ValueError, KeyError, IndexError, TypeError):
        return 0


def backlog(app: Celery) -> Backlog:
    """The backlog on the broker now (see Backlog): the queue's lists and kombu's unacked hash, read
    in one transaction."""
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        lists = [QUEUE] + [f"{QUEUE}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS[1:]]
        pipe = client.pipeline(transaction=True)
        for key in lists:
            pipe.lrange(key, 0, -1)
        pipe.hvals(UNACKED)
        *queued_lists, unacked_values = pipe.execute()
    queued = [m for messages in queued_lists for m in messages]
    unacked = []
    for value in unacked_values:
        try:
            message, _exchange, routing_key = json.loads(value)
        except (ValueError, TypeError):
            continue
        if routing_key == QUEUE:
            unacked.append(json.dumps(message))
    return Backlog(len(queued), len(unacked), sum(message_rows(m) for m in [*queued, *unacked]))
