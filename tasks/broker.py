"""kombu's Redis transport with one gap closed: a popped message is never dropped.

kombu takes a message off its queue with BRPOP and only then records it as unacknowledged (a
pipelined ZADD and HSET). If Redis goes away between the two, the popped message exists only in
this worker's memory and kombu drops it with the connection error: an accepted task is lost.
Redis with AOF has already persisted the pop, so a restart does not bring it back either.

Here the record is retried until Redis answers again (up to ``RECORD_PATIENCE_S``), so the
message is kept and runs once Redis is back. :func:`install` makes kombu resolve ``redis://``
and ``rediss://`` to this transport, so URLs keep their usual form (Flower reads them).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger("corral.broker")

RECORD_PATIENCE_S = 120.0  # longer than any Redis restart worth waiting for
TRANSPORT_PATH = "tasks.broker:Transport"
SCHEMES = ("redis", "rediss")


class DurableQoS(kombu_redis.QoS):
    """Records each delivery as unacknowledged, retrying through a Redis outage."""

    def append(self, message: Any, delivery_tag: str) -> None:
        give_up_at = time.monotonic() + RECORD_PATIENCE_S
        delay_s = 0.05
        while True:
            try:
                super().append(message, delivery_tag)
                return
            except self.channel.connection_errors as exc:
                if time.monotonic() >= give_up_at:
                    log.error("could not record message %s as unacknowledged; it is lost: %s",
                              delivery_tag, exc)  # fmt: skip
                    raise
                log.warning("Redis unavailable while recording message %s (%s); retrying",
                            delivery_tag, exc)  # fmt: skip
                time.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)


class Channel(kombu_redis.Channel):
    QoS = DurableQoS


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with :class:`Transport` in this process."""
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = TRANSPORT_PATH
