"""The worker's Celery consumer: Celery's own, made to survive a broker that goes away mid-poll."""

from __future__ import annotations

import logging

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
