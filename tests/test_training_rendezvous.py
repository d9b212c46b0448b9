"""Rendezvous with real spawned processes over gloo on loopback, including ranks that never come."""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback

import pytest

from deepspark.context.topology import local_ip
from deepspark.training.rank.rendezvous import (
    RendezvousError,
    RendezvousSpec,
    destroy_process_group,
    free_port,
    init_process_group,
)

SHORT_TIMEOUT_S = 2.0
WAIT_S = 120.0


def _all_reduce_main(rank: int, port: int, results) -> None:
    try:
        import torch
        import torch.distributed as dist

        spec = RendezvousSpec("127.0.0.1", port, world_size=2, timeout_s=60)
        init_process_group(spec, rank)
        try:
            with pytest.raises(RuntimeError, match="already belongs"):
                init_process_group(spec, rank)
            total = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
            dist.all_reduce(total)
            results.put((rank, "ok", (dist.get_rank(), dist.get_world_size(), total.tolist())))
        finally:
            destroy_process_group()
            destroy_process_group()  # twice is harmless
        assert not dist.is_initialized()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _lonely_main(rank: int, port: int, results) -> None:
    """Join a world of 2 in which the other rank never shows up."""
    spec = RendezvousSpec("127.0.0.1", port, world_size=2, timeout_s=SHORT_TIMEOUT_S)
    try:
        init_process_group(spec, rank)
        results.put((rank, "joined", ""))
    except RendezvousError as error:
        results.put((rank, "error", str(error)))
    except BaseException:
        results.put((rank, "unexpected", traceback.format_exc()))


def _file_store_main(rank: int, store_path: str, results) -> None:
    """Join a world of 3 through a file store; only ranks 0 and 1 ever come."""
    spec = RendezvousSpec(
        "127.0.0.1", 29500, world_size=3, timeout_s=SHORT_TIMEOUT_S, store_path=store_path
    )
    try:
        init_process_group(spec, rank)
        results.put((rank, "joined", ""))
    except RendezvousError as error:
        results.put((rank, "error", str(error)))
    except BaseException:
        results.put((rank, "unexpected", traceback.format_exc()))


def run_processes(target, args_per_process: list[tuple]) -> dict[int, tuple[str, object]]:
    """Run ``target(*args, results)`` in spawned processes and collect ``(key, status, value)``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=target, args=(*args, results), daemon=True)
        for args in args_per_process
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + WAIT_S
    collected: dict[int, tuple[str, object]] = {}
    try:
        while len(collected) < len(processes):
            try:
                key, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no answer within {WAIT_S:g} s; got {collected}")
            collected[key] = (status, value)
    finally:
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return collected


def test_two_ranks_rendezvous_and_all_reduce():
    port = free_port()
    results = run_processes(_all_reduce_main, [(0, port), (1, port)])
    for rank in (0, 1):
        status, value = results[rank]
        assert status == "ok", value
        assert value == (rank, 2, [3.0, 30.0])


def test_missing_peer_gives_each_rank_a_clear_error_within_the_timeout():
    # Rank 0 hosts a rendezvous nobody joins; rank 1 joins a master that is not there.
    results = run_processes(_lonely_main, [(0, free_port()), (1, free_port())])
    master_status, master_message = results[0]
    assert master_status == "error", master_message
    assert "rank 0 of 2" in master_message and "tcp://127.0.0.1:" in master_message
    assert "hosting the rendezvous" in master_message and "within 2 s" in master_message
    joiner_status, joiner_message = results[1]
    assert joiner_status == "error", joiner_message
    assert "rank 1 of 2" in joiner_message and "joining the master" in joiner_message


def test_a_failed_rendezvous_leaves_no_store_file(tmp_path):
    store_path = str(tmp_path / "rendezvous.store")
    results = run_processes(_file_store_main, [(0, store_path), (1, store_path)])
    for rank in (0, 1):
        status, message = results[rank]
        assert status == "error", message
        assert f"rank {rank} of 3" in message
    assert not os.path.exists(store_path)
    assert os.listdir(tmp_path) == []


def test_spec_is_validated_and_names_the_problem():
    assert RendezvousSpec("::1", 29500, 2).init_method == "tcp://[::1]:29500"
    for kwargs, problem in [
        ({"master_port": 0}, "master_port"),
        ({"world_size": 0}, "world_size"),
        ({"backend": "mpi"}, "backend"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"master_addr": ""}, "master_addr"),
    ]:
        arguments = {"master_addr": "127.0.0.1", "master_port": 29500, "world_size": 2, **kwargs}
        with pytest.raises(ValueError, match=problem):
            RendezvousSpec(**arguments)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        init_process_group(RendezvousSpec("127.0.0.1", 29500, 2), rank=2)


def test_free_port_can_be_bound_and_local_ip_is_an_address(monkeypatch):
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert socket.inet_aton(local_ip())
    monkeypatch.setenv("SPARK_LOCAL_IP", "10.1.2.3")
    assert local_ip() == "10.1.2.3"
