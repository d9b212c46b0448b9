"""Per-epoch trial reports from rank 0 to the search on the driver, and the prune verdict back.

A trial's fit runs in a Spark barrier stage; Optuna's trial object lives on the driver. After
each epoch, rank 0's :class:`TrialReporter` callback sends ``(trial, epoch, value)`` to the
driver's :class:`ReportServer`, which calls ``trial.report`` and ``trial.should_prune`` and
answers with the verdict. A pruned trial then ends cleanly after that epoch through the loop's
``stop_training`` vote, so its Python workers stay warm for the next trial.

The wire format is the progress channel's (`deepspark.training.progress`): the server sends a
fresh nonce on accept, the rank one HMAC-framed JSON report under the search's random key, the
server one framed answer (MAC over nonce + ``REPLY_TAG``). Every wait is bounded by a socket
timeout. This module imports neither pyspark nor Optuna; the callback runs on the ranks.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

from deepspark.training.callbacks import Callback, CallbackState
from deepspark.training.progress import (
    LENGTH_BYTES,
    MAC_BYTES,
    NONCE_BYTES,
    REPLY_TAG,
    frame,
    message_mac,
)

__all__ = ["ReportServer", "TrialReporter"]

_log = logging.getLogger(__name__)

# What the driver answers when it cannot judge (an unknown trial): train on.
_CONTINUE = {"prune": False}
_MAX_BODY_BYTES = 4096
_SERVER_READ_TIMEOUT_S = 30.0


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return bytes(data)


def _read_frame(sock: socket.socket, key: bytes, nonce: bytes) -> dict[str, Any]:
    size = int.from_bytes(_read_exactly(sock, LENGTH_BYTES), "big")
    if not MAC_BYTES < size <= MAC_BYTES + _MAX_BODY_BYTES:
        raise ValueError(f"bad message length {size}")
    message = _read_exactly(sock, size)
    mac, body = message[:MAC_BYTES], message[MAC_BYTES:]
    if not hmac.compare_digest(mac, message_mac(key, nonce, body)):
        raise ValueError("wrong key, or a frame from another connection")
    return json.loads(body)


class ReportServer:
    """Driver side: answers rank 0 of every running trial after each of its epochs.

    Parameters
    ----------
    judge : callable
        ``judge(trial_number, epoch, value) -> bool``: report the value and say whether the
        trial should stop now. Called in the server's threads, one connection at a time per
        trial.
    host : str
        The interface to listen on; ``advertise_host`` is what ranks connect to.
    advertise_host : str, optional
        Defaults to ``host``.

    Examples
    --------
    >>> seen = []
    >>> def judge(number, epoch, value):
    ...     seen.append((number, epoch, value))
    ...     return value > 1.0
    >>> with ReportServer(judge) as server:
    ...     reporter = TrialReporter(server.address, server.key_hex, trial_number=3,
    ...                              metric="val_loss")
    ...     reporter.ask(epoch=0, value=2.0)
    True
    >>> seen
    [(3, 0, 2.0)]
    """

    def __init__(
        self,
        judge: Callable[[int, int, float], bool],
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
    ) -> None:
        self.judge = judge
        self.host = host
        self.advertise_host = advertise_host or host
        self._key = secrets.token_bytes(32)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def key_hex(self) -> str:
        return self._key.hex()

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the report server is not started")
        return self.advertise_host, self._listener.getsockname()[1]

    def start(self) -> ReportServer:
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.5)  # so that stop() is seen
        self._thread = threading.Thread(
            target=self._serve, name="deepspark-automl-reports", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> ReportServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._answer, args=(connection,), name="deepspark-automl-report", daemon=True
            ).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(_SERVER_READ_TIMEOUT_S)
            nonce = secrets.token_bytes(NONCE_BYTES)
            try:
                connection.sendall(nonce)
                request = _read_frame(connection, self._key, nonce)
                number, epoch = int(request["trial"]), int(request["epoch"])
                value = float(request["value"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                _log.warning("automl report server: refused a report: %s", error)
                return
            try:
                prune = bool(self.judge(number, epoch, value))
            except Exception:
                _log.exception("automl: judging trial %d at epoch %d failed", number, epoch)
                prune = False
            try:
                answer = json.dumps({"prune": prune}).encode()
                connection.sendall(frame(self._key, nonce + REPLY_TAG, answer))
            except OSError as error:
                _log.warning("automl report server: trial %d left early: %s", number, error)


class TrialReporter(Callback):
    """Rank 0's half: report the trial's metric after each epoch, stop when told to.

    Parameters
    ----------
    address : tuple
        The driver's :attr:`ReportServer.address`.
    key_hex : str
        :attr:`ReportServer.key_hex`.
    trial_number : int
    metric : str
        The key of the epoch logs to report (``val_accuracy``, ``val_loss``, ...).
    timeout_s : float
        Bound on one report's round trip; past it the trial trains on (and says so in the log).
    """

    rank_zero_only = True

    def __init__(
        self,
        address: tuple[str, int],
        key_hex: str,
        trial_number: int,
        metric: str,
        timeout_s: float = 60.0,
    ) -> None:
        self.address = tuple(address)
        self.key_hex = key_hex
        self.trial_number = int(trial_number)
        self.metric = metric
        self.timeout_s = float(timeout_s)

    def on_epoch_end(self, state: CallbackState) -> None:
        if self.metric not in state.logs:
            raise KeyError(
                f"AutoEstimator(metric={self.metric!r}): the epoch logs have no such value; "
                f"they have {sorted(state.logs)}. Pass validation_data for val_* metrics, or "
                f"name one of these"
            )
        value = float(state.logs[self.metric])
        if math.isfinite(value) and self.ask(state.epoch, value):
            state.stop_training = True

    def ask(self, epoch: int, value: float) -> bool:
        """Send one report; return the driver's verdict (``True``: stop this trial now)."""
        body = json.dumps({"trial": self.trial_number, "epoch": int(epoch), "value": value})
        key = bytes.fromhex(self.key_hex)
        try:
            with socket.create_connection(self.address, timeout=self.timeout_s) as connection:
                nonce = _read_exactly(connection, NONCE_BYTES)
                connection.sendall(frame(key, nonce, body.encode()))
                answer = _read_frame(connection, key, nonce + REPLY_TAG)
        except (OSError, ValueError) as error:
            _log.warning(
                "automl trial %d: epoch %d not reported to the driver at %s:%d (%s); training on",
                self.trial_number,
                epoch,
                *self.address,
                error,
            )
            answer = _CONTINUE
        return bool(answer.get("prune", False))
