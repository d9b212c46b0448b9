"""The one authenticated channel between a driver and the tasks of its jobs: its wire format.

A driver-side :class:`~deepspark.context.channel_server.ChannelServer` listens for one job (a
fit, a search); the tasks open a :class:`~deepspark.context.channel_client.ChannelClient` with
the server's ``address`` and ``token`` and send small JSON messages. Training streams its
progress and meets for the rendezvous over it (`deepspark.training.progress`); AutoML trials
report each epoch and hear whether to stop (`deepspark.automl.reports`).

Wire format: on accepting a connection the server sends a fresh random nonce
(:data:`NONCE_BYTES` bytes); from then on every message from the client is
``length (4 bytes, big-endian) | HMAC-SHA256 (32 bytes) | JSON``. The MAC covers the
connection's nonce followed by the JSON, keyed with the job's secret token, so only the job's
own tasks can speak and a message recorded on one connection is worthless on any other; the
JSON carries a per-connection sequence number ``seq`` that must grow, so a recorded message
cannot be replayed on its own connection either. A bad message is counted in
``ChannelServer.rejected`` and its connection closed; connections beyond ``max_connections``
are closed at once and counted in ``ChannelServer.refused``. The server itself never fails
because of what a peer sends.

Messages are dicts with a string ``kind``. Most are one-way events, kept in the server's
history. A kind the server has a responder for is a request: the server answers it with one
frame, MAC'd over the nonce, :data:`REPLY_TAG` and the JSON (so a client's own frame sent back
to it is no reply), whose JSON carries ``reply_to``, the request's ``seq``. Every wait on
either side is bounded by a timeout and ends with an error that says what was awaited.

Neither side imports pyspark or torch.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "LENGTH_BYTES",
    "MAC_BYTES",
    "MAX_MESSAGE_BYTES",
    "NONCE_BYTES",
    "REPLY_TAG",
    "frame",
    "jsonable",
    "message_mac",
]

MAX_MESSAGE_BYTES = 1 << 20
NONCE_BYTES = 16
DEFAULT_MAX_CONNECTIONS = 1024
LENGTH_BYTES = 4
MAC_BYTES = hashlib.sha256().digest_size
REPLY_TAG = b"deepspark-reply"


def message_mac(key: bytes, nonce: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 of ``nonce + body`` under ``key``."""
    return hmac.new(key, nonce + body, hashlib.sha256).digest()


def frame(key: bytes, nonce: bytes, body: bytes) -> bytes:
    """One message on the wire: its length, its MAC, then ``body``.

    Examples
    --------
    >>> data = frame(b"key", b"nonce", b'{"kind": "log"}')
    >>> int.from_bytes(data[:LENGTH_BYTES], "big") == MAC_BYTES + 15
    True
    """
    size = len(body) + MAC_BYTES
    return size.to_bytes(LENGTH_BYTES, "big") + message_mac(key, nonce, body) + body


def jsonable(value: Any) -> Any:
    """Numbers from torch and numpy become plain numbers; anything else its text.

    Examples
    --------
    >>> import numpy as np
    >>> jsonable(np.float32(0.5)), jsonable(object()).startswith("<object")
    (0.5, True)
    """
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
