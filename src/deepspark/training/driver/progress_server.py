"""Driver side of the progress channel: the job's channel server, and the rendezvous it answers.

See :mod:`deepspark.training.progress` for the events and the rendezvous, and
:mod:`deepspark.context.channel` for the wire format. No pyspark here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from deepspark.context.channel import DEFAULT_MAX_CONNECTIONS
from deepspark.context.channel_server import ChannelServer, Peer

__all__ = ["ProgressServer"]

_log = logging.getLogger(__name__)


class ProgressServer(ChannelServer):
    """Driver side: receives the progress events of one job's ranks and answers their
    rendezvous (:meth:`~deepspark.training.rank.progress_client.ProgressClient.exchange`).

    Parameters are those of :class:`~deepspark.context.channel_server.ChannelServer`; a
    job's ``max_connections`` is its ``world_size``.

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
        super().__init__(
            host=host,
            port=port,
            token=token,
            sink=sink,
            advertise_host=advertise_host,
            max_events=max_events,
            max_connections=max_connections,
            responders={"hello": self._hello},
            purpose="progress",
        )
        # the rendezvous of the newest attempt: rank -> (its connection, its hello)
        self._hello_attempt = -1
        self._hellos: dict[int, tuple[Peer, dict[str, Any]]] = {}
        self.rendezvous_done = 0  # rendezvous answered, for tests and logs

    def _hello(self, peer: Peer, event: dict[str, Any]) -> None:
        """One rank's part of the rendezvous; the last of an attempt's ranks gets all answered."""
        try:
            attempt = int(event["attempt"])
            world_size = int(event["world_size"])
            rank = int(event["rank"])
            if "payload" not in event:
                raise KeyError("payload")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed rendezvous hello ({error})") from None
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
        self._hellos[rank] = (peer, event)
        # a rank that left no longer waits for the others
        self._hellos = {number: hello for number, hello in self._hellos.items() if hello[0].open}
        if len(self._hellos) < world_size:
            return
        hellos, self._hellos = self._hellos, {}
        answer = {"attempt": attempt, "peers": [hellos[n][1]["payload"] for n in range(world_size)]}
        self.rendezvous_done += 1
        for waiter, request in hellos.values():
            self.reply(waiter, request, answer)
