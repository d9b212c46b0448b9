"""The progress channel over real loopback sockets, with real client processes."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import multiprocessing
import socket

import pytest

from deepspark.context.channel import NONCE_BYTES
from deepspark.training.driver.progress_bar import ProgressBar
from deepspark.training.driver.progress_server import ProgressServer
from deepspark.training.rank.progress_client import ProgressClient
from deepspark.training.rank.rendezvous import free_port

STEPS = 200
WAIT_S = 60.0


def _client_main(address, token, rank: int) -> None:
    with ProgressClient(address, token, rank, timeout_s=10) as client:
        for step in range(STEPS):
            client.send(
                {"kind": "step", "epoch": 0, "step": step, "steps": STEPS, "loss": 1.0 / (step + 1)}
            )
        client.send({"kind": "epoch", "epoch": 0, "metrics": {"train_loss": 0.25}})


def _finished_ranks(events) -> set[int]:
    return {event["rank"] for event in events if event["kind"] == "epoch"}


def test_events_from_two_client_processes_arrive_in_order_per_rank():
    received = []
    context = multiprocessing.get_context("spawn")
    with ProgressServer(host="127.0.0.1", sink=received.append) as server:
        clients = [
            context.Process(target=_client_main, args=(server.address, server.token, rank))
            for rank in (0, 1)
        ]
        for process in clients:
            process.start()
        try:
            arrived = server.wait_for(lambda events: _finished_ranks(events) == {0, 1}, WAIT_S)
        finally:
            for process in clients:
                process.join(timeout=WAIT_S)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)
        assert arrived, f"only ranks {_finished_ranks(server.events())} finished"
        assert [process.exitcode for process in clients] == [0, 0]
        history = server.events()
    assert server.rejected == 0
    assert received == history  # the sink saw every event, in the same order
    for rank in (0, 1):
        mine = [event for event in history if event["rank"] == rank]
        assert [event["kind"] for event in mine] == ["step"] * STEPS + ["epoch"]
        assert [event["step"] for event in mine[:-1]] == list(range(STEPS))
        assert [event["seq"] for event in mine] == list(range(STEPS + 1))
    assert len(server.events("epoch")) == 2


def _raw_frame(size: int, payload: bytes) -> bytes:
    return size.to_bytes(4, "big") + payload


def test_wrong_token_and_garbage_are_rejected_without_harm():
    with ProgressServer(host="127.0.0.1") as server:
        with ProgressClient(server.address, "not-the-token", rank=0, timeout_s=5) as intruder:
            intruder.send({"kind": "log", "text": "let me in"})
        assert server.wait_for(lambda _: server.rejected >= 1, WAIT_S)
        for garbage in (_raw_frame(40, b"\x00" * 40), _raw_frame(1 << 30, b"")):
            with socket.create_connection(server.address, timeout=5) as raw:
                raw.sendall(garbage)
        assert server.wait_for(lambda _: server.rejected >= 3, WAIT_S)
        assert server.events() == []
        # The server still serves the job's own ranks.
        with ProgressClient(server.address, server.token, rank=1, timeout_s=5) as client:
            client.send({"kind": "log", "text": "hello"})
        assert server.wait_for(lambda events: len(events) == 1, WAIT_S)
    assert server.events()[0]["text"] == "hello"


def _greeted(server) -> tuple[socket.socket, bytes]:
    """A raw connection to ``server`` and the nonce it was greeted with."""
    raw = socket.create_connection(server.address, timeout=5)
    nonce = b""
    while len(nonce) < NONCE_BYTES:
        chunk = raw.recv(NONCE_BYTES - len(nonce))
        assert chunk, "the server closed the connection instead of greeting it"
        nonce += chunk
    return raw, nonce


def _signed_frame(token: str, nonce: bytes, event: dict) -> bytes:
    body = json.dumps(event).encode()
    mac = hmac.new(token.encode(), nonce + body, hashlib.sha256).digest()
    return _raw_frame(len(mac) + len(body), mac + body)


def test_a_frame_recorded_on_one_connection_is_refused_on_another():
    with ProgressServer(host="127.0.0.1") as server:
        first, first_nonce = _greeted(server)
        recorded = _signed_frame(server.token, first_nonce, {"kind": "log", "seq": 0, "text": "a"})
        with first:
            first.sendall(recorded)
            assert server.wait_for(lambda events: len(events) == 1, WAIT_S)
        second, second_nonce = _greeted(server)
        assert second_nonce != first_nonce
        with second:
            second.sendall(recorded)  # the replay: valid token, valid sequence, wrong connection
            assert server.wait_for(lambda _: server.rejected == 1, WAIT_S)
            assert second.recv(1) == b""  # and the server hung up on it
        assert [event["text"] for event in server.events()] == ["a"]


def test_connections_beyond_max_connections_are_closed_and_counted():
    with pytest.raises(ValueError, match="max_connections"):
        ProgressServer(max_connections=0)
    with ProgressServer(host="127.0.0.1", max_connections=2) as server:
        ranks = [_greeted(server)[0] for _ in range(2)]
        with socket.create_connection(server.address, timeout=5) as extra:
            assert extra.recv(NONCE_BYTES) == b""  # closed without a greeting
        assert server.refused == 1
        # A rank that leaves frees its place (a retried job reconnects).
        ranks.pop().close()
        with ProgressClient(server.address, server.token, rank=1, timeout_s=5) as client:
            client.send({"kind": "log", "text": "retry"})
        assert server.wait_for(lambda events: len(events) == 1, WAIT_S)
        assert client.dropped == 0 and server.refused == 1
        for raw in ranks:
            raw.close()
    with pytest.raises(OSError):  # the port closes with the server
        socket.create_connection(server.address, timeout=5).close()


def test_stopping_with_connected_clients_does_not_hang(caplog):
    server = ProgressServer(host="127.0.0.1").start()
    clients = [ProgressClient(server.address, server.token, rank, timeout_s=5) for rank in (0, 1)]
    for client in clients:
        client.send({"kind": "log", "text": "connected"})
    assert server.wait_for(lambda events: len(events) == 2, WAIT_S)
    with caplog.at_level(logging.WARNING, logger="deepspark.context.channel_client"):
        server.stop(timeout_s=10)
        assert not server._thread.is_alive()
        with pytest.raises(OSError):
            socket.create_connection(server.address, timeout=5).close()
        for client in clients:
            for step in range(50):  # the first sends may still reach the closed socket's buffer
                client.send({"kind": "step", "epoch": 0, "step": step})
            client.close(timeout_s=10)
    assert all(client.dropped >= 1 for client in clients)
    warnings = [record for record in caplog.records if "progress channel" in record.getMessage()]
    assert sorted(record.getMessage().split(":")[0] for record in warnings) == ["rank 0", "rank 1"]


def test_client_without_a_driver_warns_once_and_drops(caplog):
    address = ("127.0.0.1", free_port())  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="deepspark.context.channel_client"):
        client = ProgressClient(address, "token", rank=3, timeout_s=5)
        for step in range(5):
            client.send({"kind": "step", "step": step})
        client.close(timeout_s=10)
    assert client.dropped == 5
    assert len([r for r in caplog.records if "could not connect" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="string 'kind'"):
        client.send({"step": 1})


def test_sink_errors_are_logged_once_and_serving_goes_on(caplog):
    def failing_sink(event):
        raise RuntimeError("sink bug")

    with (
        caplog.at_level(logging.ERROR, logger="deepspark.context.channel_server"),
        ProgressServer(host="127.0.0.1", sink=failing_sink) as server,
    ):
        with ProgressClient(server.address, server.token, rank=0) as client:
            for step in range(3):
                client.send({"kind": "step", "step": step})
        assert server.wait_for(lambda events: len(events) == 3, WAIT_S)
    assert len([r for r in caplog.records if "progress sink failed" in r.getMessage()]) == 1


EPOCH_EVENTS = [
    {
        "kind": "step",
        "rank": 0,
        "epoch": 0,
        "epochs": 2,
        "step": 5,
        "steps": 10,
        "loss": 0.7,
        "samples_per_s": 1234.5,
    },
    {"kind": "step", "rank": 1, "epoch": 0, "epochs": 2, "step": 6, "steps": 10, "loss": 9.0},
    {
        "kind": "step",
        "rank": 0,
        "epoch": 0,
        "epochs": 2,
        "step": 10,
        "steps": 10,
        "loss": 0.6,
        "samples_per_s": 1500.0,
    },
    {
        "kind": "epoch",
        "rank": 0,
        "epoch": 0,
        "metrics": {"epoch": 0, "train_loss": 0.61234, "val_accuracy": 0.9, "train_rows": 640},
    },
    {"kind": "log", "rank": 1, "text": "spilled 640 rows"},
    {"kind": "error", "rank": 1, "error": "RuntimeError: boom", "traceback": "..."},
]


def test_progress_bar_writes_one_line_per_epoch_without_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(file=out)  # a StringIO is no terminal: no per-step output
    for event in EPOCH_EVENTS:
        bar(event)
    bar.close()
    assert out.getvalue().splitlines() == [
        "epoch 1/2: train_loss=0.6123, val_accuracy=0.9, train_rows=640",
        "[rank 1] spilled 640 rows",
        "[rank 1] failed: RuntimeError: boom",
    ]


def test_progress_bar_shows_steps_with_tqdm():
    out = io.StringIO()
    bar = ProgressBar(file=out, use_tqdm=True)
    for event in EPOCH_EVENTS:
        bar(event)
    bar.close()
    text = out.getvalue()
    assert "epoch 1/2" in text and "10/10" in text
    assert "loss=0.6" in text and "samples/s=1500" in text
    assert "loss=9" not in text  # only rank 0's steps drive the bar
    assert "epoch 1/2: train_loss=0.6123" in text


def test_progress_bar_keeps_the_ranks_bookkeeping_to_itself():
    out = io.StringIO()
    bar = ProgressBar(file=out)
    bar({"kind": "log", "rank": 0, "text": "timeline", "timeline": {"task_start": 1.0}})
    bar({"kind": "log", "rank": 0, "text": "process group ready", "rendezvous_port": 41000})
    bar({"kind": "log", "rank": 1, "text": "spilled 640 rows"})
    bar.close()
    assert out.getvalue().splitlines() == ["[rank 1] spilled 640 rows"]
