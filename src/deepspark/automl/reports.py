"""Per-epoch trial reports from rank 0 to the search on the driver, and the prune verdict back.

A trial's fit runs in a Spark barrier stage; Optuna's trial object lives on the driver. After
each epoch, rank 0's :class:`TrialReporter` callback asks the driver's :class:`ReportServer`
a ``report`` request ``(trial, epoch, value)``; the server calls ``trial.report`` and
``trial.should_prune`` and answers with the verdict. A pruned trial then ends cleanly after
that epoch through the loop's ``stop_training`` vote, so its Python workers stay warm for the
next trial.

Reports travel over the project's one authenticated channel (`deepspark.context.channel`):
a nonce per connection, HMAC-framed JSON under the search's random token, every wait bounded.
This module imports neither pyspark nor Optuna; the callback runs on the ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from deepspark.context.channel_client import ChannelClient
from deepspark.context.channel_server import ChannelServer, Peer
from deepspark.training.callbacks import Callback, CallbackState

__all__ = ["ReportServer", "TrialReporter"]

_log = logging.getLogger(__name__)

# What the driver answers when it cannot judge (an unknown trial): train on.
_CONTINUE = {"prune": False}


class ReportServer(ChannelServer):
    """Driver side: answers rank 0 of every running trial after each of its epochs.

    Parameters
    ----------
    judge : callable
        ``judge(trial_number, epoch, value) -> bool``: report the value and say whether the
        trial should stop now. Called in the server's thread, one report at a time.
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
    ...     reporter = TrialReporter(server.address, server.token, trial_number=3,
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
        super().__init__(
            host=host,
            advertise_host=advertise_host,
            responders={"report": self._answer},
            purpose="automl report",
        )
        self.judge = judge

    def _answer(self, peer: Peer, request: dict[str, Any]) -> None:
        try:
            number, epoch = int(request["trial"]), int(request["epoch"])
            value = float(request["value"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"a malformed report ({error})") from None
        try:
            prune = bool(self.judge(number, epoch, value))
        except Exception:
            _log.exception("automl: judging trial %d at epoch %d failed", number, epoch)
            prune = False
        self.reply(peer, request, {"prune": prune})


class TrialReporter(Callback):
    """Rank 0's half: report the trial's metric after each epoch, stop when told to.

    Parameters
    ----------
    address : tuple
        The driver's :attr:`ReportServer.address`.
    token : str
        :attr:`ReportServer.token`.
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
        token: str,
        trial_number: int,
        metric: str,
        timeout_s: float = 60.0,
    ) -> None:
        self.address = tuple(address)
        self.token = token
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
        report = {"kind": "report", "trial": self.trial_number, "epoch": int(epoch), "value": value}
        try:
            with ChannelClient(
                self.address, self.token, rank=0, timeout_s=self.timeout_s, purpose="automl report"
            ) as client:
                answer = client.request(report, timeout_s=self.timeout_s)
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
