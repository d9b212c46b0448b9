"""Rank side of the progress channel: the client that sends a rank's events to the driver.

See :mod:`deepspark.training.progress` for the wire format. No pyspark here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from typing import Any

from deepspark.training.progress import (
    MAC_BYTES,
    MAX_MESSAGE_BYTES,
    NONCE_BYTES,
    frame,
    jsonable,
)

__all__ = ["ProgressClient"]

_log = logging.getLogger(__name__)


class ProgressClient:
    """Worker side: sends events to the driver without ever slowing or failing training.

    Events go into a bounded queue that a daemon thread drains: :meth:`send` returns at once.
    If the driver cannot be reached (or goes away), the client logs one warning and drops
    events from then on, counting them in :attr:`dropped`.

    Parameters
    ----------
    address : tuple of (str, int)
        :attr:`ProgressServer.address`.
    token : str
        :attr:`ProgressServer.token`.
    rank : int
        Added to every event.
    timeout_s : float, default 5.0
        Bound on connecting, on each send, and on flushing in :meth:`close`.
    max_pending : int, default 10_000
        Events waiting beyond this are dropped.

    Examples
    --------
    >>> from deepspark.training.driver.progress_server import ProgressServer
    >>> with ProgressServer(host="127.0.0.1") as server:
    ...     client = ProgressClient(server.address, server.token, rank=1, timeout_s=5)
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
    ) -> None:
        self.address = (str(address[0]), int(address[1]))
        self.rank = int(rank)
        self.timeout_s = float(timeout_s)
        self.dropped = 0
        self._key = token.encode()
        self._seq = 0
        self._nonce = b""
        self._pending: queue.Queue[bytes | None] = queue.Queue(maxsize=max_pending)
        self._sock: socket.socket | None = None
        self._broken = False
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._drain, name="deepspark-progress-client", daemon=True
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
            raise ValueError(f"a progress event is a dict with a string 'kind', got {event!r}")
        if self._broken or self._closed:
            self.dropped += 1
            return
        with self._lock:
            message = {**event, "rank": event.get("rank", self.rank), "seq": self._seq}
            self._seq += 1
        message.setdefault("time", time.time())
        body = json.dumps(message, default=jsonable).encode()
        if len(body) + MAC_BYTES > MAX_MESSAGE_BYTES:
            self.dropped += 1
            _log.warning("progress event of %d bytes dropped: over the limit", len(body))
            return
        try:
            self._pending.put_nowait(body)  # framed once the connection's nonce is known
        except queue.Full:
            self.dropped += 1

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

    def __enter__(self) -> ProgressClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _give_up(self, what: str, error: BaseException) -> None:
        if not self._broken:
            self._broken = True
            _log.warning(
                "rank %d: progress channel to the driver at %s:%d %s (%s); training goes on "
                "without live progress",
                self.rank,
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
                        "connections, or not a deepspark progress server)"
                    )
                nonce += chunk
        except BaseException:
            sock.close()
            raise
        self._nonce = nonce
        return sock

    def _drain(self) -> None:
        while True:
            body = self._pending.get()
            if body is None:
                break
            if self._broken:
                self.dropped += 1
                continue
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(frame(self._key, self._nonce, body))
            except OSError as error:
                self.dropped += 1
                self._give_up("could not be used" if self._sock else "could not connect", error)
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.close()
                    self._sock = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
