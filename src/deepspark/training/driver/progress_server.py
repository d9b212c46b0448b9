"""Driver side of the progress channel: the server that receives the ranks' events.

See :mod:`deepspark.training.progress` for the wire format. No pyspark here.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import json
import logging
import secrets
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from deepspark.training.progress import (
    DEFAULT_MAX_CONNECTIONS,
    LENGTH_BYTES,
    MAC_BYTES,
    MAX_MESSAGE_BYTES,
    NONCE_BYTES,
    REPLY_TAG,
    frame,
    message_mac,
)

__all__ = ["ProgressServer"]

_log = logging.getLogger(__name__)


class _Connection:
    def __init__(self, sock: socket.socket, peer: Any, nonce: bytes) -> None:
        self.sock = sock
        self.peer = peer
        self.nonce = nonce
        self.buffer = bytearray()
        self.last_seq = -1


class ProgressServer:
    """Driver side: receives authenticated events from the ranks of one job.

    A TCP server on a free port, served by one daemon thread. Use it as a context manager (or
    call :meth:`start` and :meth:`stop`); ship :attr:`address` and :attr:`token` to the ranks.

    Parameters
    ----------
    host : str, default "127.0.0.1"
        The one interface to listen on: loopback by default; the driver's cluster-facing
        address when executors run on other hosts. ``"0.0.0.0"`` (every interface) works but
        exposes the port more widely than needed.
    port : int, default 0
        0 picks a free port.
    token : str, optional
        The job's secret; a fresh random one by default.
    sink : callable, optional
        Called with each accepted event, in the server thread, in arrival order (per rank:
        in sending order). Its exceptions are logged, never raised.
    advertise_host : str, optional
        The host name or address ranks connect to. Defaults to ``host``, or this machine's
        address (:func:`deepspark.context.topology.local_ip`) when ``host`` is a wildcard.
    max_events : int, default 100_000
        History length; older events are forgotten first.
    max_connections : int, optional
        The most connections open at once: a job's ``world_size`` (each rank opens one).
        Further connections are closed at once and counted in :attr:`refused`. ``None``
        lifts the bound; the default, :data:`DEFAULT_MAX_CONNECTIONS`, is only a backstop.

    Examples
    --------
    >>> from deepspark.training.rank.progress_client import ProgressClient
    >>> with ProgressServer(host="127.0.0.1") as server:
    ...     with ProgressClient(server.address, server.token, rank=0) as client:
    ...         client.send({"kind": "log", "text": "hello"})
    ...     server.wait_for(lambda events: len(events) == 1, timeout_s=10)
    True
    >>> [(event["kind"], event["rank"], event["text"]) for event in server.events()]
    [('log', 0, 'hello')]
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
        advertise_host: str | None = None,
        max_events: int = 100_000,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1 or None, got {max_connections}")
        self.host = host
        self.port = port
        self.token = token or secrets.token_hex(32)
        self.sink = sink
        self.advertise_host = advertise_host
        self.max_connections = max_connections
        self.rejected = 0
        self.refused = 0
        self._connections: set[_Connection] = set()
        self._key = self.token.encode()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None
        self._wake_send: socket.socket | None = None
        self._sink_failed = False
        # the rendezvous of the newest attempt: rank -> (its connection, its payload)
        self._hello_attempt = -1
        self._hellos: dict[int, tuple[_Connection, Any]] = {}
        self.rendezvous_done = 0  # rendezvous answered, for tests and logs

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for the ranks to connect to; available once started."""
        if self._bound_port is None:
            raise RuntimeError("the progress server is not started")
        port = self._bound_port
        if self.advertise_host:
            return self.advertise_host, port
        if self.host in ("", "0.0.0.0", "::"):
            from deepspark.context.topology import local_ip

            return local_ip(), port
        return self.host, port

    def start(self) -> ProgressServer:
        """Bind, listen and start serving; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("the progress server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._bound_port = int(listener.getsockname()[1])
        wake_receive, self._wake_send = socket.socketpair()
        wake_receive.setblocking(False)
        self._thread = threading.Thread(
            target=self._serve,
            args=(listener, wake_receive),
            name="deepspark-progress",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close every connection and the listening socket, join the thread.

        Safe to call more than once; connected clients see their connection closed.
        """
        if self._thread is None:
            return
        self._stopping.set()
        if self._wake_send is not None:
            with contextlib.suppress(OSError):
                self._wake_send.send(b"x")
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            _log.warning("the progress server thread did not stop within %g s", timeout_s)
        if self._wake_send is not None:
            self._wake_send.close()
            self._wake_send = None

    def __enter__(self) -> ProgressServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Return a copy of the history, optionally only events of one ``kind``."""
        with self._changed:
            return [event for event in self._events if kind is None or event["kind"] == kind]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(history)`` is true or ``timeout_s`` passes; return which."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(list(self._events)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))
            return True

    # --- the server thread ----------------------------------------------------------------

    def _serve(self, listener: socket.socket, wake: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "listener")
        selector.register(wake, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=1.0):
                    if key.data == "listener":
                        self._accept(listener, selector)
                    elif isinstance(key.data, _Connection):
                        self._read(key.data, selector)
        except Exception:  # a bug here must not take the driver down with it
            _log.exception("the progress server stopped on an unexpected error")
        finally:
            for key in list(selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            selector.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        if self._full():
            # A retried job's ranks may connect before their predecessors' goodbyes were read.
            self._read_pending(selector)
        if self._full():
            self.refused += 1
            _log.warning(
                "progress server: refused a connection from %s (already %d of at most %d)",
                peer,
                len(self._connections),
                self.max_connections,
            )
            with contextlib.suppress(OSError):
                sock.close()
            with self._changed:
                self._changed.notify_all()
            return
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            sent = sock.send(nonce)  # a fresh socket's send buffer is empty: this never blocks
        except OSError:
            sent = 0
        if sent != NONCE_BYTES:
            with contextlib.suppress(OSError):
                sock.close()
            return
        connection = _Connection(sock, peer, nonce)
        self._connections.add(connection)
        selector.register(sock, selectors.EVENT_READ, connection)

    def _full(self) -> bool:
        return self.max_connections is not None and len(self._connections) >= self.max_connections

    def _read_pending(self, selector: selectors.BaseSelector) -> None:
        """Read whatever the open connections have sent, so closed ones are noticed now."""
        for connection in list(self._connections):
            while connection in self._connections:
                ready, _, _ = select.select([connection.sock], [], [], 0)
                if not ready:
                    break
                self._read(connection, selector)

    def _close(self, connection: _Connection, selector: selectors.BaseSelector) -> None:
        self._connections.discard(connection)
        for rank, (waiting, _) in list(self._hellos.items()):
            if waiting is connection:  # a rank that left no longer waits for the others
                del self._hellos[rank]
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(connection.sock)
        with contextlib.suppress(OSError):
            connection.sock.close()

    def _reject(self, connection: _Connection, selector, reason: str) -> None:
        self.rejected += 1
        _log.warning("progress server: rejected a message from %s (%s)", connection.peer, reason)
        self._close(connection, selector)
        with self._changed:
            self._changed.notify_all()

    def _read(self, connection: _Connection, selector: selectors.BaseSelector) -> None:
        try:
            chunk = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(connection, selector)
            return
        buffer = connection.buffer
        buffer += chunk
        while len(buffer) >= LENGTH_BYTES:
            size = int.from_bytes(buffer[:LENGTH_BYTES], "big")
            if not MAC_BYTES < size <= MAX_MESSAGE_BYTES:
                self._reject(connection, selector, f"bad message length {size}")
                return
            if len(buffer) < LENGTH_BYTES + size:
                return
            message = bytes(buffer[LENGTH_BYTES : LENGTH_BYTES + size])
            del buffer[: LENGTH_BYTES + size]
            mac, body = message[:MAC_BYTES], message[MAC_BYTES:]
            if not hmac.compare_digest(mac, message_mac(self._key, connection.nonce, body)):
                self._reject(
                    connection, selector, "wrong token, or a frame from another connection"
                )
                return
            try:
                event = json.loads(body)
                seq = int(event["seq"])
                valid = isinstance(event.get("kind"), str)
            except (ValueError, KeyError, TypeError):
                valid, seq = False, -1
            if not valid or seq <= connection.last_seq:
                self._reject(connection, selector, "malformed or replayed message")
                return
            connection.last_seq = seq
            if event["kind"] == "hello":
                self._hello(connection, event, selector)
                if connection not in self._connections:
                    return
            else:
                self._record(event)

    def _hello(self, connection: _Connection, event: dict[str, Any], selector) -> None:
        """One rank's part of the rendezvous; the last of an attempt's ranks gets all answered."""
        try:
            attempt = int(event["attempt"])
            world_size = int(event["world_size"])
            rank = int(event["rank"])
            payload = event["payload"]
        except (KeyError, TypeError, ValueError):
            self._reject(connection, selector, "malformed rendezvous hello")
            return
        if not 0 <= rank < world_size or attempt < self._hello_attempt:
            _log.warning(
                "progress server: ignored a hello of rank %d, attempt %d (now attempt %d)",
                rank,
                attempt,
                self._hello_attempt,
            )
            return
        if attempt > self._hello_attempt:  # an older attempt's stragglers wait no more
            self._hello_attempt = attempt
            self._hellos = {}
        self._hellos[rank] = (connection, payload)
        if len(self._hellos) < world_size:
            return
        peers = [self._hellos[number][1] for number in range(world_size)]
        body = json.dumps({"attempt": attempt, "peers": peers}).encode()
        waiting = [waiter for waiter, _ in self._hellos.values()]
        self._hellos = {}
        self.rendezvous_done += 1
        for waiter in waiting:
            self._reply(waiter, body, selector)

    def _reply(self, connection: _Connection, body: bytes, selector) -> None:
        data = frame(self._key, connection.nonce + REPLY_TAG, body)
        try:
            connection.sock.settimeout(10.0)  # a few kB; a peer that takes no data is dropped
            connection.sock.sendall(data)
            connection.sock.setblocking(False)
        except OSError as error:
            _log.warning("progress server: no rendezvous answer to %s (%s)", connection.peer, error)
            self._close(connection, selector)

    def _record(self, event: dict[str, Any]) -> None:
        event["received"] = time.time()
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception:
            if not self._sink_failed:
                self._sink_failed = True
                _log.exception("the progress sink failed; later failures are not logged")
