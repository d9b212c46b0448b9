"""The live channel from training ranks to the driver (DESIGN decision 7).

The driver runs a :class:`ProgressServer` for one job and ships its ``address`` and ``token``
to the workers in the job's spec; each rank opens a :class:`ProgressClient` and sends small
JSON events. The server keeps the history and hands each event to a sink, such as the
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
=========  ================================================================================

Neither side imports pyspark or torch: this module runs on the driver and in the workers.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import json
import logging
import queue
import secrets
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "EVENT_KINDS",
    "NONCE_BYTES",
    "ProgressClient",
    "ProgressServer",
]

_log = logging.getLogger(__name__)

EVENT_KINDS = ("step", "epoch", "log", "error")
MAX_MESSAGE_BYTES = 1 << 20
NONCE_BYTES = 16
DEFAULT_MAX_CONNECTIONS = 1024
_LENGTH_BYTES = 4
_MAC_BYTES = hashlib.sha256().digest_size


def _mac(key: bytes, nonce: bytes, body: bytes) -> bytes:
    return hmac.new(key, nonce + body, hashlib.sha256).digest()


def _frame(key: bytes, nonce: bytes, body: bytes) -> bytes:
    size = len(body) + _MAC_BYTES
    return size.to_bytes(_LENGTH_BYTES, "big") + _mac(key, nonce, body) + body


def _jsonable(value: Any) -> Any:
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
        address (:func:`deepspark.training.rank.rendezvous.local_ip`) when ``host`` is a wildcard.
    max_events : int, default 100_000
        History length; older events are forgotten first.
    max_connections : int, optional
        The most connections open at once: a job's ``world_size`` (each rank opens one).
        Further connections are closed at once and counted in :attr:`refused`. ``None``
        lifts the bound; the default, :data:`DEFAULT_MAX_CONNECTIONS`, is only a backstop.

    Examples
    --------
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

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for the ranks to connect to; available once started."""
        if self._bound_port is None:
            raise RuntimeError("the progress server is not started")
        port = self._bound_port
        if self.advertise_host:
            return self.advertise_host, port
        if self.host in ("", "0.0.0.0", "::"):
            from deepspark.training.rank.rendezvous import local_ip

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
        while len(buffer) >= _LENGTH_BYTES:
            size = int.from_bytes(buffer[:_LENGTH_BYTES], "big")
            if not _MAC_BYTES < size <= MAX_MESSAGE_BYTES:
                self._reject(connection, selector, f"bad message length {size}")
                return
            if len(buffer) < _LENGTH_BYTES + size:
                return
            message = bytes(buffer[_LENGTH_BYTES : _LENGTH_BYTES + size])
            del buffer[: _LENGTH_BYTES + size]
            mac, body = message[:_MAC_BYTES], message[_MAC_BYTES:]
            if not hmac.compare_digest(mac, _mac(self._key, connection.nonce, body)):
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
            self._record(event)

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
        body = json.dumps(message, default=_jsonable).encode()
        if len(body) + _MAC_BYTES > MAX_MESSAGE_BYTES:
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
                self._sock.sendall(_frame(self._key, self._nonce, body))
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
