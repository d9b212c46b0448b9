"""Joining ``torch.distributed`` from a plain, picklable spec (worker side; no pyspark).

The Spark layer picks the master address and port (rank 0 binds a free port and shares it with
``BarrierTaskContext.allGather``), builds a :class:`RendezvousSpec` and ships it to every task;
each task then calls :func:`init_process_group` with its rank. Everything here is bounded by the
spec's timeout: a rank whose peers never arrive gets a :class:`RendezvousError` naming the
master address and its rank instead of a hang.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from deepspark.errors import DeepsparkError

__all__ = [
    "RendezvousError",
    "RendezvousSpec",
    "destroy_process_group",
    "free_port",
    "init_process_group",
    "process_group",
]

_BACKENDS = ("gloo", "nccl")


class RendezvousError(DeepsparkError, RuntimeError):
    """A rank could not join the process group (peers missing, master unreachable, timeout).

    Its message names the rank, the world size, the ``tcp://`` address and the timeout; the
    error torch raised is its ``__cause__``.
    """


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    The port is released before returning, so another process could take it first; the
    rendezvous then fails with a clear error and the job is retried.

    Parameters
    ----------
    host : str, default "127.0.0.1"
        The address the port will be bound on (``"0.0.0.0"`` for all interfaces).

    Returns
    -------
    int

    Examples
    --------
    >>> 0 < free_port() < 65536
    True
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class RendezvousSpec:
    """Where and how the ranks of one training job meet.

    Parameters
    ----------
    master_addr : str
        Address of rank 0's host, reachable from every rank.
    master_port : int
        A port free on that host; rank 0 listens there.
    world_size : int
        Number of ranks.
    backend : {"gloo", "nccl"}, default "gloo"
        ``"gloo"`` for CPU training, ``"nccl"`` for GPUs.
    timeout_s : float, default 120
        Bound on joining and on every later collective.
    store_path : str, optional
        When every rank runs on one machine (Spark's local modes): a file the ranks meet in
        (a ``FileStore``), so no port is opened for the rendezvous at all.

    Examples
    --------
    >>> RendezvousSpec("127.0.0.1", 29500, world_size=2).init_method
    'tcp://127.0.0.1:29500'
    """

    master_addr: str
    master_port: int
    world_size: int
    backend: str = "gloo"
    timeout_s: float = 120.0
    store_path: str | None = None

    def __post_init__(self) -> None:
        if not self.master_addr:
            raise ValueError("master_addr must be a host name or address, got an empty string")
        if not 0 < int(self.master_port) < 65536:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}")
        if int(self.world_size) < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        self.master_port = int(self.master_port)
        self.world_size = int(self.world_size)

    @property
    def init_method(self) -> str:
        """The ``tcp://`` URL handed to ``torch.distributed.init_process_group``."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


_store: Any = None  # this process's rendezvous store, while it is in a group


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def init_process_group(spec: RendezvousSpec, rank: int) -> None:
    """Join the process group described by ``spec`` as ``rank``, within ``spec.timeout_s``.

    Blocks until all ``spec.world_size`` ranks have joined. ``spec.timeout_s`` also becomes the
    timeout of later collectives, so a peer that dies mid-training surfaces as an error on the
    others rather than a hang.

    Parameters
    ----------
    spec : RendezvousSpec
    rank : int
        This process's rank, ``0 <= rank < spec.world_size``; rank 0 hosts the store.

    Raises
    ------
    RendezvousError
        When the group cannot be formed in time; the message names the master address, the
        rank and the timeout, and the original error is chained. A file store
        (``spec.store_path``) is removed first.
    RuntimeError
        When this process already belongs to a process group.

    Examples
    --------
    >>> spec = RendezvousSpec("127.0.0.1", free_port(), world_size=1, timeout_s=30)
    >>> init_process_group(spec, rank=0)
    >>> import torch.distributed as dist
    >>> dist.get_world_size()
    1
    >>> destroy_process_group()
    """
    import torch.distributed as dist

    if not 0 <= rank < spec.world_size:
        raise ValueError(f"rank must be in 0..{spec.world_size - 1}, got {rank}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed process group; call "
            "destroy_process_group() first"
        )
    global _store
    try:
        # The store is made here, not by torch's init_method, so that it can be dropped at
        # destroy time: torch's own (libuv) TCP store keeps listening for the life of the
        # process, and Spark reuses its Python workers across jobs.
        if spec.store_path is not None:
            _store = dist.FileStore(spec.store_path, spec.world_size)
        else:
            _store = dist.TCPStore(
                spec.master_addr,
                spec.master_port,
                spec.world_size,
                is_master=rank == 0,
                timeout=timedelta(seconds=spec.timeout_s),
                wait_for_workers=False,
                use_libuv=False,
            )
        dist.init_process_group(
            backend=spec.backend,
            store=_store,
            world_size=spec.world_size,
            rank=rank,
            timeout=timedelta(seconds=spec.timeout_s),
        )
    except Exception as error:  # torch raises RuntimeError, DistStoreError, TimeoutError, ...
        destroy_process_group()
        gc.collect()  # a failed group's store (a file store too) goes now, as before
        if spec.store_path is not None:
            # torch removes a FileStore's file only once every rank has let go of it, which
            # never happens when some rank is missing: a failed rendezvous removes it here.
            with contextlib.suppress(OSError):
                os.remove(spec.store_path)
        role = "hosting the rendezvous" if rank == 0 else "joining the master"
        raise RendezvousError(
            f"rank {rank} of {spec.world_size} could not form the {spec.backend} process group "
            f"at {spec.init_method} ({role}) within {spec.timeout_s:g} s: "
            f"{type(error).__name__}: {_first_line(error)}. Check that every rank started, "
            f"that {spec.master_addr}:{spec.master_port} is reachable from all hosts, and "
            "that no other process took the port."
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else "(no message)"


def destroy_process_group() -> None:
    """Leave the current process group, if any; safe to call any number of times.

    Examples
    --------
    >>> destroy_process_group()
    >>> destroy_process_group()
    """
    import torch.distributed as dist

    global _store
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _store is not None:
        listens = not isinstance(_store, dist.FileStore)
        _store = None
        if listens:
            gc.collect()  # closes the TCP store's listening socket now


@contextlib.contextmanager
def process_group(spec: RendezvousSpec, rank: int) -> Iterator[None]:
    """Context manager: :func:`init_process_group` on entry, :func:`destroy_process_group`
    on exit (also after an error).

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> spec = RendezvousSpec("127.0.0.1", free_port(), world_size=1, timeout_s=30)
    >>> with process_group(spec, rank=0):
    ...     total = torch.ones(2)
    ...     dist.all_reduce(total)
    >>> total.tolist(), dist.is_initialized()
    ([1.0, 1.0], False)
    """
    init_process_group(spec, rank)
    try:
        yield
    finally:
        destroy_process_group()
