"""The worker's Celery consumer: Celery's own, made to survive a broker that goes away mid-poll,
and its expected failures logged as one line, not a traceback."""

from __future__ import annotations

import logging

from celery.exceptions import Reject
from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    """Celery 5.7.0 closes a lost connection a second time after `collect()` has detached its
    transport. When the broker dropped while a blocking pop was in flight and the worker held a
    chunk, the first close stopped short, and the second one tries to hand the held chunk back
    through the detached transport: `AttributeError` ("'NoneType' object has no attribute
    'hostname'"), "Unrecoverable error", and the worker exits with its warm model. Here that one
    failure is a line, and the consumer reconnects as after any other broker loss; the held
    chunk comes back from the broker's unacked set (or, if the broker lost it, from `wait`'s
    re-send)."""

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as e:
            if self.connection is not None:  # not the detached connection's close: a bug to see
                raise
            log.warning("closing the lost broker connection failed (%s: %s); reconnecting", type(e).__name__, e)


class OneLine(logging.Filter):
    """Celery logs every Reject a task raises (a chunk handed back at a warm stop, or to a worker with
    the job's model) with its traceback, and kombu logs an ack or reject that a lost link cut short
    at CRITICAL with one (the message comes back after the visibility timeout all the same). Both
    are expected: here each is a warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Reject) or str(record.msg).startswith(("Couldn't reject", "Couldn't ack")):
            record.exc_info, record.exc_text = None, None
            record.levelno = min(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        return True


def quiet_expected_failures() -> None:
    """Put OneLine on the loggers those lines come from (filters on a logger outlast Celery's log set-up)."""
    for name in ("celery.app.trace", "celery.worker.request", "celery.worker.consumer.consumer"):
        logging.getLogger(name).addFilter(OneLine())
