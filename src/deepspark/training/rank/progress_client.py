"""Rank side of the progress channel: the job's channel client, and the rank's rendezvous.

See :mod:`deepspark.training.progress` for the events and the rendezvous, and
:mod:`deepspark.context.channel` for the wire format. No pyspark here.
"""

from __future__ import annotations

from typing import Any

from deepspark.context.channel_client import ChannelClient

__all__ = ["ProgressClient"]


class ProgressClient(ChannelClient):
    """Worker side: sends a rank's progress events without ever slowing or failing training,
    and meets the other ranks through the driver (:meth:`exchange`).

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
        super().__init__(address, token, rank, timeout_s, max_pending, purpose="progress")

    def exchange(
        self, payload: dict[str, Any], *, attempt: int, world_size: int, timeout_s: float
    ) -> list[Any]:
        """The rendezvous: send this rank's ``payload``, return every rank's, in rank order.

        The driver answers once all ``world_size`` ranks of ``attempt`` have sent theirs.

        Parameters
        ----------
        payload : dict
            JSON-able; what the other ranks need to know of this one.
        attempt : int
            The job's attempt; a later attempt's rendezvous replaces an earlier one's.
        world_size : int
        timeout_s : float
            Bound on the whole exchange.

        Returns
        -------
        list
            The payloads of ranks ``0 .. world_size - 1``.

        Raises
        ------
        ConnectionError
            The driver cannot be reached, or closed the channel.
        TimeoutError
            Not every rank arrived within ``timeout_s``.

        Examples
        --------
        >>> from deepspark.training.driver.progress_server import ProgressServer
        >>> with ProgressServer(host="127.0.0.1") as server:
        ...     with ProgressClient(server.address, server.token, rank=0) as client:
        ...         client.exchange({"port": 1}, attempt=1, world_size=1, timeout_s=10)
        [{'port': 1}]
        """
        hello = {
            "kind": "hello",
            "attempt": int(attempt),
            "world_size": int(world_size),
            "payload": payload,
        }
        try:
            answer = self.request(hello, timeout_s=timeout_s)
        except TimeoutError as error:
            raise TimeoutError(
                f"rank {self.rank}: not every rank reached the rendezvous at the driver in "
                f"{timeout_s:g} s (a rank failed to start, or the cluster has fewer free slots)"
            ) from error
        if int(answer.get("attempt", -1)) != int(attempt):
            raise ConnectionError(f"rank {self.rank}: a rendezvous answer for another attempt")
        return list(answer["peers"])
