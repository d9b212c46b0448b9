"""The live channel from training ranks to the driver (DESIGN decision 7): its wire format.

The driver runs a :class:`~deepspark.training.driver.progress_server.ProgressServer` for one
job and ships its ``address`` and ``token`` to the workers in the job's spec; each rank opens a
:class:`~deepspark.training.rank.progress_client.ProgressClient` and sends small JSON events.
The server keeps the history and hands each event to a sink, such as the
:class:`~deepspark.training.driver.progress_bar.ProgressBar`.

Wire format: on accepting a connection the server sends a fresh random nonce
(:data:`NONCE_BYTES` bytes); from then on every message from the client is
``length (4 bytes, big-endian) | HMAC-SHA256 (32 bytes) | JSON``. The MAC covers the
connection's nonce followed by the JSON, keyed with the job's secret token, so only the job's
own ranks can speak and a message recorded on one connection is worthless on any other; the
JSON carries a per-connection sequence number that must grow, so a recorded message cannot be
replayed on its own connection either. A bad message is counted in
:attr:`ProgressServer.rejected` and its connection closed; connections beyond
``max_connections`` are closed at once and counted in :attr:`ProgressServer.refused`. The
server itself never fails because of what a peer sends.

Events are dicts with a ``kind``; the client adds ``rank``, ``seq`` and ``time``. The kinds the
driver understands:

=========  ================================================================================
``step``   ``epoch``, ``epochs``, ``step``, ``steps``, ``loss``, ``samples_per_s``
``epoch``  ``epoch``, ``metrics`` (dict of the epoch's reduced values)
``log``    ``text``
``error``  ``error`` (one line), ``traceback`` (its tail)
``hello``  ``attempt``, ``world_size``, ``payload``: the rank's part of the rendezvous
=========  ================================================================================

The rendezvous is the one exchange that goes both ways. Each rank sends a ``hello`` and waits;
once the server holds ``world_size`` hellos of the same ``attempt``, it answers each of those
connections with one frame ``{"attempt": ..., "peers": [payload of rank 0, rank 1, ...]}``,
framed as above but with a MAC over the nonce, :data:`REPLY_TAG` and the JSON (so a client's
own frame sent back to it is no reply). Hellos are not kept in the history. Spark's own
``BarrierTaskContext.allGather`` would do the same job, but each call costs about one second
(``benchmarks/barrier.py``): the driver's channel, which every rank dials anyway, answers in
milliseconds.

Neither side imports pyspark or torch. This module holds what both sides share: the event
kinds, the framing and the MAC.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "EVENT_KINDS",
    "LENGTH_BYTES",
    "MAC_BYTES",
    "MAX_MESSAGE_BYTES",
    "NONCE_BYTES",
    "REPLY_TAG",
    "frame",
    "jsonable",
    "message_mac",
]

EVENT_KINDS = ("step", "epoch", "log", "error", "hello")
MAX_MESSAGE_BYTES = 1 << 20
NONCE_BYTES = 16
DEFAULT_MAX_CONNECTIONS = 1024
LENGTH_BYTES = 4
MAC_BYTES = hashlib.sha256().digest_size
REPLY_TAG = b"deepspark-reply"


def message_mac(key: bytes, nonce: bytes, body: bytes) -> bytes:
    return hmac.new(key, nonce + body, hashlib.sha256).digest()


def frame(key: bytes, nonce: bytes, body: bytes) -> bytes:
    size = len(body) + MAC_BYTES
    return size.to_bytes(LENGTH_BYTES, "big") + message_mac(key, nonce, body) + body


def jsonable(value: Any) -> Any:
    """Numbers from torch and numpy become plain numbers; anything else its text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # arrays of several elements
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)
