"""Task side of the channel: the client that sends a task's messages to the driver and asks
it questions.

See :mod:`deepspark.context.channel` for the wire format. No pyspark here.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from typing import Any

from deepspark.context.channel import (
    LENGTH_BYTES,
    MAC_BYTES,
    MAX_MESSAGE_BYTES,
    NONCE_BYTES,
    REPLY_TAG,
    frame,
    jsonable,
    message_mac,
)

__all__ = ["ChannelClient"]

_log = logging.getLogger(__name__)


class ChannelClient:
    """Task side: sends events to the driver without ever slowing or failing the task, and
    asks it requests whose answers it waits for, bounded.

    Events go into a bounded queue that a daemon thread drains: :meth:`send` returns at once.
    If the driver cannot be reached (or goes away), the client logs one warning and drops
    events from then on, counting them in :attr:`dropped`.

    Parameters
    ----------
    address : tuple of (str, int)
        ``ChannelServer.address``.
    token : str
        ``ChannelServer.token``.
    rank : int
        Added to every event.
    timeout_s : float, default 5.0
        Bound on connecting, on each send, and on flushing in :meth:`close`.
    max_pending : int, default 10_000
        Events waiting beyond this are dropped.
    purpose : str, default "channel"
        What the channel carries, for log messages ("progress", "automl report").

    Examples
    --------
    >>> from deepspark.context.channel_server import ChannelServer
    >>> with ChannelServer(host="127.0.0.1") as server:
    ...     client = ChannelClient(server.address, server.token, rank=1, timeout_s=5)
    ...     client.send({"kind": "step", "epoch": 0, "step": 1, "steps": 10, "loss": 0.5})
    ...     client.close()
    ...     server.wait_for(lambda events: len(events) == 1, timeout_s=10)
    True
    """

    def __init__(
        self,
        address: tuple[str, int] | list[Any],
        token: str,
        rank: int,
        timeout_s: float = 5.0,
        max_pending: int = 10_000,
        purpose: str = "channel",
    ) -> None:
        self.address = (str(address[0]), int(address[1]))
        self.rank = int(rank)
        self.timeout_s = float(timeout_s)
        self.purpose = purpose
        self.dropped = 0
        self._key = token.encode()
        self._seq = 0
        self._nonce = b""
        # framed bodies, each with the event its sending sets (a request waits on it)
        self._pending: queue.Queue[tuple[bytes, threading.Event | None] | None] = queue.Queue(
            maxsize=max_pending
        )
        self._sock: socket.socket | None = None
        self._broken = False
        self._failure = ""
        self._closed = False
        self._lock = threading.Lock()
        self._asking = threading.Lock()  # one request at a time reads the answers
        self._thread = threading.Thread(
            target=self._drain, name=f"deepspark-{purpose.replace(' ', '-')}-client", daemon=True
        )
        self._thread.start()

    def send(self, event: dict[str, Any]) -> None:
        """Queue one event for the driver; never blocks and never raises for the network.

        Parameters
        ----------
        event : dict
            Must have a string ``kind``; values must be JSON-able (tensors and numpy numbers
            are converted, anything else sent as text). ``rank``, ``seq`` and ``time`` are added.

        Raises
        ------
        ValueError
            When ``event`` has no string ``kind``.
        """
        if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
            raise ValueError(
                f"a {self.purpose} event is a dict with a string 'kind', got {event!r}"
            )
        if self._broken or self._closed:
            self.dropped += 1
            return
        message = {**event, "rank": event.get("rank", self.rank)}
        message.setdefault("time", time.time())
        with self._lock:  # sequence numbers reach the queue in order: the server checks them
            message["seq"] = self._seq
            body = json.dumps(message, default=jsonable).encode()
            if len(body) + MAC_BYTES > MAX_MESSAGE_BYTES:
                self.dropped += 1
                _log.warning(
                    "%s event of %d bytes dropped: over the limit", self.purpose, len(body)
                )
                return
            try:
                self._pending.put_nowait((body, None))  # framed once the nonce is known
            except queue.Full:
                self.dropped += 1
                return
            self._seq += 1

    def request(self, message: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """Send ``message`` (a kind the server answers) and return the server's answer.

        Parameters
        ----------
        message : dict
            With a string ``kind``; JSON-able. ``rank`` and ``seq`` are added.
        timeout_s : float
            Bound on the whole exchange.

        Raises
        ------
        ConnectionError
            The driver cannot be reached, closed the channel, or answered with a frame that
            is not its answer to this request.
        TimeoutError
            No answer within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        if self._broken or self._closed:
            raise ConnectionError(
                f"rank {self.rank}: the {self.purpose} channel to the driver at "
                f"{self.address[0]}:{self.address[1]} is not usable ({self._failure or 'closed'})"
            )
        with self._asking:
            sent = threading.Event()
            with self._lock:
                seq = self._seq
                body = json.dumps(
                    {**message, "rank": message.get("rank", self.rank), "seq": seq},
                    default=jsonable,
                ).encode()
                self._pending.put((body, sent), timeout=timeout_s)
                self._seq += 1
            if not sent.wait(max(0.0, deadline - time.monotonic())) or self._sock is None:
                raise ConnectionError(
                    f"rank {self.rank}: could not send a {message['kind']!r} request to the "
                    f"driver at {self.address[0]}:{self.address[1]} "
                    f"({self._failure or 'timed out'})"
                )
            return self._read_answer(self._sock, message["kind"], seq, deadline)

    def _read_answer(
        self, sock: socket.socket, kind: str, seq: int, deadline: float
    ) -> dict[str, Any]:
        buffer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"rank {self.rank}: the driver at {self.address[0]}:{self.address[1]} did "
                    f"not answer the {kind!r} request in time"
                )
            readable, _, _ = select.select([sock], [], [], min(remaining, 1.0))
            if not readable:
                continue
            try:
                chunk = sock.recv(65536)
            except OSError as error:
                raise ConnectionError(
                    f"rank {self.rank}: the driver's {self.purpose} channel failed: {error}"
                ) from error
            if not chunk:
                raise ConnectionError(
                    f"rank {self.rank}: the driver closed the {self.purpose} channel before "
                    f"answering the {kind!r} request"
                )
            buffer += chunk
            if len(buffer) < LENGTH_BYTES:
                continue
            size = int.from_bytes(buffer[:LENGTH_BYTES], "big")
            if not MAC_BYTES < size <= MAX_MESSAGE_BYTES * 64:
                raise ConnectionError(f"rank {self.rank}: a bad {kind!r} answer ({size} bytes)")
            if len(buffer) < LENGTH_BYTES + size:
                continue
            mac = buffer[LENGTH_BYTES : LENGTH_BYTES + MAC_BYTES]
            body = buffer[LENGTH_BYTES + MAC_BYTES : LENGTH_BYTES + size]
            if not hmac.compare_digest(mac, message_mac(self._key, self._nonce + REPLY_TAG, body)):
                raise ConnectionError(
                    f"rank {self.rank}: the {kind!r} answer did not come from this job's driver"
                )
            answer = json.loads(body)
            if answer.pop("reply_to", None) != seq:
                raise ConnectionError(f"rank {self.rank}: an answer to another {kind!r} request")
            return answer

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued (bounded by ``timeout_s``, default the client's), then close."""
        if self._closed:
            return
        self._closed = True
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with contextlib.suppress(queue.Full):
            self._pending.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)
        sock = self._sock
        if sock is not None:  # unblocks a send stuck on a dead peer
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(1.0)

    def __enter__(self) -> ChannelClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _give_up(self, what: str, error: BaseException) -> None:
        if not self._broken:
            self._broken = True
            self._failure = f"{what}: {error}"
            _log.warning(
                "rank %d: %s channel to the driver at %s:%d %s (%s); the task goes on without it",
                self.rank,
                self.purpose,
                *self.address,
                what,
                error,
            )

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout_s)
        try:
            nonce = b""
            while len(nonce) < NONCE_BYTES:
                chunk = sock.recv(NONCE_BYTES - len(nonce))
                if not chunk:
                    raise ConnectionError(
                        "the driver closed the connection before greeting it (too many "
                        "connections, or not a deepspark channel server)"
                    )
                nonce += chunk
        except BaseException:
            sock.close()
            raise
        self._nonce = nonce
        return sock

    def _drain(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                break
            body, sent = item
            if self._broken:
                self.dropped += 1
                if sent is not None:
                    sent.set()  # the waiting request sees the failure at once
                continue
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(frame(self._key, self._nonce, body))
                if sent is not None:
                    sent.set()
            except OSError as error:
                self.dropped += 1
                self._give_up("could not be used" if self._sock else "could not connect", error)
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.close()
                    self._sock = None
                if sent is not None:
                    sent.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
