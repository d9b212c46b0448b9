"""Driver side of the channel: the server that receives the tasks' messages and answers
their requests.

See :mod:`deepspark.context.channel` for the wire format. No pyspark here.
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
from collections.abc import Callable, Mapping
from typing import Any

from deepspark.context.channel import (
    DEFAULT_MAX_CONNECTIONS,
    LENGTH_BYTES,
    MAC_BYTES,
    MAX_MESSAGE_BYTES,
    NONCE_BYTES,
    REPLY_TAG,
    frame,
    jsonable,
    message_mac,
)

__all__ = ["ChannelServer", "Peer", "Responder"]

_log = logging.getLogger(__name__)
# The longest a reply may take to leave: a few kB; a peer that takes no data is dropped.
_REPLY_TIMEOUT_S = 10.0


class Peer:
    """One task's connection, as a responder sees it: where it comes from and whether it is
    still open (a task that left is answered no more)."""

    def __init__(self, sock: socket.socket, address: Any, nonce: bytes) -> None:
        self.sock = sock
        self.address = address
        self.nonce = nonce
        self.buffer = bytearray()
        self.last_seq = -1
        self.open = True


# A responder answers one kind of request: ``responder(peer, request)``, in the server thread;
# it calls `ChannelServer.reply` now or later (a rendezvous answers once every rank asked).
Responder = Callable[[Peer, dict[str, Any]], None]


class ChannelServer:
    """Driver side: receives authenticated messages from the tasks of one job.

    A TCP server on a free port, served by one daemon thread. Use it as a context manager (or
    call :meth:`start` and :meth:`stop`); ship :attr:`address` and :attr:`token` to the tasks.
    One-way events go to the history (:meth:`events`, :meth:`wait_for`) and to ``sink``;
    requests of a kind in ``responders`` go to their responder, which answers with
    :meth:`reply`.

    Parameters
    ----------
    host : str, default "127.0.0.1"
        The one interface to listen on: loopback by default; the driver's cluster-facing
        address when executors run on other hosts
        (:func:`deepspark.context.topology.driver_address`). ``"0.0.0.0"`` (every interface)
        works but exposes the port more widely than needed.
    port : int, default 0
        0 picks a free port.
    token : str, optional
        The job's secret; a fresh random one by default.
    sink : callable, optional
        Called with each accepted event, in the server thread, in arrival order (per task: in
        sending order). Its exceptions are logged, never raised.
    advertise_host : str, optional
        The host name or address tasks connect to. Defaults to ``host``, or this machine's
        address (:func:`deepspark.context.topology.local_ip`) when ``host`` is a wildcard.
    max_events : int, default 100_000
        History length; older events are forgotten first.
    max_connections : int, optional
        The most connections open at once (a job's ``world_size``: each rank opens one).
        Further connections are closed at once and counted in :attr:`refused`. ``None``
        lifts the bound; the default, :data:`DEFAULT_MAX_CONNECTIONS`, is only a backstop.
    responders : mapping, optional
        ``{kind: responder}``: the request kinds this server answers (:data:`Responder`).
    purpose : str, default "channel"
        What the channel carries, for log messages ("progress", "automl report").

    Examples
    --------
    >>> from deepspark.context.channel_client import ChannelClient
    >>> def double(peer, request):
    ...     server.reply(peer, request, {"twice": 2 * request["number"]})
    >>> with ChannelServer(responders={"double": double}) as server:
    ...     with ChannelClient(server.address, server.token, rank=0) as client:
    ...         client.send({"kind": "log", "text": "hello"})
    ...         answer = client.request({"kind": "double", "number": 21}, timeout_s=10)
    ...     server.wait_for(lambda events: len(events) == 1, timeout_s=10)
    True
    >>> answer["twice"], [(event["kind"], event["text"]) for event in server.events()]
    (42, [('log', 'hello')])
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
        responders: Mapping[str, Responder] | None = None,
        purpose: str = "channel",
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1 or None, got {max_connections}")
        self.host = host
        self.port = port
        self.token = token or secrets.token_hex(32)
        self.sink = sink
        self.advertise_host = advertise_host
        self.max_connections = max_connections
        self.purpose = purpose
        self.rejected = 0
        self.refused = 0
        self._responders = dict(responders or {})
        self._connections: set[Peer] = set()
        self._key = self.token.encode()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None
        self._wake_send: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._sink_failed = False

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for the tasks to connect to; available once started."""
        if self._bound_port is None:
            raise RuntimeError(f"the {self.purpose} server is not started")
        port = self._bound_port
        if self.advertise_host:
            return self.advertise_host, port
        if self.host in ("", "0.0.0.0", "::"):
            from deepspark.context.topology import local_ip

            return local_ip(), port
        return self.host, port

    def start(self) -> ChannelServer:
        """Bind, listen and start serving; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError(f"the {self.purpose} server is already started")
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
            name=f"deepspark-{self.purpose.replace(' ', '-')}",
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
            _log.warning("the %s server thread did not stop within %g s", self.purpose, timeout_s)
        if self._wake_send is not None:
            self._wake_send.close()
            self._wake_send = None

    def __enter__(self) -> ChannelServer:
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

    def reply(self, peer: Peer, request: dict[str, Any], answer: dict[str, Any]) -> None:
        """Answer ``request`` on ``peer``'s connection (from a responder, in the server thread).

        A peer that left, or takes no data within a few seconds, is dropped with a warning.
        """
        if not peer.open:
            return
        body = json.dumps({**answer, "reply_to": request["seq"]}, default=jsonable).encode()
        data = frame(self._key, peer.nonce + REPLY_TAG, body)
        try:
            peer.sock.settimeout(_REPLY_TIMEOUT_S)
            peer.sock.sendall(data)
            peer.sock.setblocking(False)
        except OSError as error:
            _log.warning("%s server: no answer to %s (%s)", self.purpose, peer.address, error)
            self._close(peer)

    # --- the server thread ----------------------------------------------------------------

    def _serve(self, listener: socket.socket, wake: socket.socket) -> None:
        selector = self._selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "listener")
        selector.register(wake, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=1.0):
                    if key.data == "listener":
                        self._accept(listener)
                    elif isinstance(key.data, Peer):
                        self._read(key.data)
        except Exception:  # a bug here must not take the driver down with it
            _log.exception("the %s server stopped on an unexpected error", self.purpose)
        finally:
            for key in list(selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            for peer in self._connections:
                peer.open = False
            selector.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        if self._full():
            # A retried job's ranks may connect before their predecessors' goodbyes were read.
            self._read_pending()
        if self._full():
            self.refused += 1
            _log.warning(
                "%s server: refused a connection from %s (already %d of at most %d)",
                self.purpose,
                address,
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
        peer = Peer(sock, address, nonce)
        self._connections.add(peer)
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, peer)

    def _full(self) -> bool:
        return self.max_connections is not None and len(self._connections) >= self.max_connections

    def _read_pending(self) -> None:
        """Read whatever the open connections have sent, so closed ones are noticed now."""
        for peer in list(self._connections):
            while peer in self._connections:
                ready, _, _ = select.select([peer.sock], [], [], 0)
                if not ready:
                    break
                self._read(peer)

    def _close(self, peer: Peer) -> None:
        peer.open = False
        self._connections.discard(peer)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(peer.sock)
        with contextlib.suppress(OSError):
            peer.sock.close()

    def _reject(self, peer: Peer, reason: str) -> None:
        self.rejected += 1
        _log.warning(
            "%s server: rejected a message from %s (%s)", self.purpose, peer.address, reason
        )
        self._close(peer)
        with self._changed:
            self._changed.notify_all()

    def _read(self, peer: Peer) -> None:
        try:
            chunk = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(peer)
            return
        buffer = peer.buffer
        buffer += chunk
        while peer.open and len(buffer) >= LENGTH_BYTES:
            size = int.from_bytes(buffer[:LENGTH_BYTES], "big")
            if not MAC_BYTES < size <= MAX_MESSAGE_BYTES:
                self._reject(peer, f"bad message length {size}")
                return
            if len(buffer) < LENGTH_BYTES + size:
                return
            message = bytes(buffer[LENGTH_BYTES : LENGTH_BYTES + size])
            del buffer[: LENGTH_BYTES + size]
            mac, body = message[:MAC_BYTES], message[MAC_BYTES:]
            if not hmac.compare_digest(mac, message_mac(self._key, peer.nonce, body)):
                self._reject(peer, "wrong token, or a frame from another connection")
                return
            try:
                event = json.loads(body)
                seq = int(event["seq"])
                valid = isinstance(event.get("kind"), str)
            except (ValueError, KeyError, TypeError):
                valid, seq = False, -1
            if not valid or seq <= peer.last_seq:
                self._reject(peer, "malformed or replayed message")
                return
            peer.last_seq = seq
            responder = self._responders.get(event["kind"])
            if responder is not None:
                self._respond(responder, peer, event)
            else:
                self._record(event)

    def _respond(self, responder: Responder, peer: Peer, request: dict[str, Any]) -> None:
        try:
            responder(peer, request)
        except ValueError as error:  # a request the responder cannot take: as a bad message
            self._reject(peer, f"{request['kind']} request: {error}")
        except Exception:  # a responder's bug fails that request, not the server
            _log.exception(
                "%s server: answering a %r request failed", self.purpose, request["kind"]
            )
            self._close(peer)

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
                _log.exception("the %s sink failed; later failures are not logged", self.purpose)
