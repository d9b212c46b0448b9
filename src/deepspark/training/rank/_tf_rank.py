"""One rank of a Keras TensorFlow-backend job, inside its Spark task. No pyspark here, and no
TensorFlow either: TensorFlow runs in the worker process this rank starts
(`deepspark.training.rank._tf_worker`, which says why it is a process of its own).

`run_tf_rank` is the barrier task's work (`stage.run_barrier_stage` calls it): it starts the
worker process at once (TensorFlow's import overlaps the rest), spills the partition's Arrow
rows as the torch engine does, meets the other ranks through the driver's progress channel
(each rank's host, a free port for its TensorFlow server and its row counts), sends the worker
its job (``TF_CONFIG`` built from those addresses, the spill, every rank's row count), relays
the worker's progress to the driver, and yields rank 0's results. Every wait is bounded: the
input by the job's collective timeout, the meeting by the progress channel's, the forming of
the TensorFlow cluster by the collective timeout again; once formed, TensorFlow's own
collective timeout and heartbeats end a worker whose peer died.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from deepspark.errors import DeepsparkError
from deepspark.training.job_spec import (
    RESULT_CHUNK_BYTES,
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    ResultKind,
    TrainSpec,
)

__all__ = ["TFWorkerError", "WorkerJob", "run_tf_rank"]

_RESULT_SCHEMA = pa.schema(
    [("rank", pa.int32()), ("kind", pa.string()), ("seq", pa.int32()), ("payload", pa.binary())]
)
_LOG_TAIL_LINES = 15


@dataclass
class WorkerJob:
    """Everything the worker process needs, sent by its Spark task once the ranks have met."""

    spec: Any  # deepspark.training.job_spec.TrainSpec
    rank: int
    spill: Any  # deepspark.data.PartitionSpill (a copy that does not own the files)
    tf_config: dict[str, Any]
    train_rows: list[int]  # every rank's training rows, in rank order
    output_dir: str
    marks: dict[str, float] = field(default_factory=dict)


class TFWorkerError(DeepsparkError, RuntimeError):
    """The rank's TensorFlow worker process failed; the message names the rank and why."""


def run_tf_rank(
    spec: TrainSpec, batches: Iterable[pa.RecordBatch], context: Any
) -> Iterator[pa.RecordBatch]:
    """Run one rank of a Keras TensorFlow-backend fit or evaluate; rank 0 yields the results.

    `context` is the task's `deepspark.training.rank.run.RankContext`.
    """
    from deepspark.training.rank.progress_client import ProgressClient

    rank = context.rank
    progress = None
    if spec.progress_address is not None:
        progress = ProgressClient(spec.progress_address, spec.progress_token, rank, timeout_s=10)
    work_dir = tempfile.mkdtemp(prefix=f"deepspark-tf-{spec.job_id}-{rank}-", dir=context.spill_dir)
    worker = None
    stream = None
    try:
        worker = _WorkerProcess(rank, work_dir)
        stream = _spill_stream(spec, batches, context)
        spill = stream.finish(spec.collective_timeout_s)
        peers = _meet(spec, context, progress, spill)
        context.marks["ranks_met"] = time.time()
        job = WorkerJob(
            spec=spec,
            rank=rank,
            spill=spill,
            tf_config={
                "cluster": {"worker": [_address(peer) for peer in peers]},
                "task": {"type": "worker", "index": rank},
            },
            train_rows=[int(peer["train_rows"]) for peer in peers],
            output_dir=work_dir,
            marks={**context.marks, **stream.marks},
        )
        worker.send(job)
        marks = worker.follow(progress, timeout_s=spec.collective_timeout_s)
        if rank == 0:
            if progress is not None:
                port = int(peers[0]["port"])
                progress.send({"kind": "log", "text": "timeline", "timeline": marks})
                progress.send(
                    {"kind": "log", "text": "TensorFlow cluster ran", "rendezvous_port": port}
                )
            yield from _results(work_dir)
    except BaseException as error:
        reported = worker is not None and worker.reported  # the worker's own report went
        if progress is not None and not isinstance(error, GeneratorExit) and not reported:
            progress.send(
                {
                    "kind": "error",
                    "rank": rank,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            )
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if worker is not None:
            worker.stop()
        if stream is not None:
            stream.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        if progress is not None:
            progress.close()


def _spill_stream(spec: TrainSpec, batches: Iterable[pa.RecordBatch], context: Any):
    """The partition spilled on a background thread, as the torch engine spills it."""
    from deepspark.data import rows_from_chunks
    from deepspark.data.stream import StreamingSpill

    needed = [name for tensor in (*spec.features, *spec.labels) for name in tensor.columns]
    rows = rows_from_chunks(batches, list(dict.fromkeys(needed)))
    return StreamingSpill(rows, context.spill_dir, split_column=SPLIT_COLUMN, feed_split=None)


def _address(peer: dict[str, Any]) -> str:
    host = str(peer["host"])
    return f"[{host}]:{peer['port']}" if ":" in host else f"{host}:{peer['port']}"


def _meet(spec: TrainSpec, context: Any, progress: Any, spill: Any) -> list[dict[str, Any]]:
    """Every rank's TensorFlow address and row counts, in rank order."""
    from deepspark.context.topology import local_ip
    from deepspark.training.rank.rendezvous import free_port
    from deepspark.training.rank.run import exchange_hellos

    rank = context.rank
    host = spec.rendezvous_host or local_ip()
    hello = {
        "rank": rank,
        "host": host,
        "port": free_port(host),  # this rank's TensorFlow server binds it
        "train_rows": spill.num_rows(TRAIN_SPLIT),
        "validation_rows": spill.num_rows(VALIDATION_SPLIT),
    }
    return exchange_hellos(spec, context, progress, hello)


class _WorkerProcess:
    """The rank's TensorFlow worker: a child process, its message pipe and its log file."""

    def __init__(self, rank: int, work_dir: str) -> None:
        self.rank = rank
        self.log_path = os.path.join(work_dir, "worker.log")
        self.reported = False  # the worker's own error went to the driver
        self._buffer = b""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        env["KERAS_BACKEND"] = "tensorflow"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "deepspark.training.rank._tf_worker",
                    str(write_fd),
                    str(os.getpid()),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=env,
            )
        os.close(write_fd)
        self._messages = os.fdopen(read_fd, "rb", buffering=0)

    def send(self, job: Any) -> None:
        import cloudpickle

        data = cloudpickle.dumps(job)
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(len(data).to_bytes(8, "big") + data)
            self.process.stdin.close()
        except BrokenPipeError:
            self._raise_failure(None)

    def follow(self, progress: Any, timeout_s: float) -> dict[str, float]:
        """Relay the worker's progress until it is done; its marks. The TensorFlow cluster
        must form within `timeout_s`; a worker that fails or dies raises `TFWorkerError`."""
        deadline = time.monotonic() + timeout_s
        formed = False
        while True:
            message = self._next_message(None if formed else deadline)
            if message is None:
                if self.process.poll() is not None or formed:
                    self._raise_failure(None)
                raise TFWorkerError(
                    f"rank {self.rank} and its peers did not form the TensorFlow cluster within "
                    f"{timeout_s:g} s (a peer did not start, or its address is unreachable)"
                    f"{self._log_tail()}"
                )
            kind = message.get("kind")
            if kind == "ready":
                formed = True
            elif kind == "progress" and progress is not None:
                progress.send(message["event"])
            elif kind == "error":
                self._raise_failure(message, progress)
            elif kind == "done":
                self.process.wait(timeout=60)
                return dict(message.get("marks") or {})

    def _next_message(self, deadline: float | None) -> dict[str, Any] | None:
        """The next message; None when the worker ended (or `deadline` passed) without one."""
        while b"\n" not in self._buffer:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            readable, _, _ = select.select([self._messages], [], [], wait)
            if readable:
                chunk = self._messages.read(65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _raise_failure(self, message: dict[str, Any] | None, progress: Any = None) -> None:
        if message is not None:
            error = str(message.get("error"))
            if progress is not None:
                event = {"kind": "error", "rank": self.rank, "error": error}
                event["traceback"] = str(message.get("traceback", ""))
                if "time" in message:
                    event["time"] = message["time"]
                progress.send(event)
                self.reported = True
            raise TFWorkerError(f"rank {self.rank}: {error}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        code = self.process.poll()
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            why = f"was killed by signal {-code} ({name})"
        elif code is not None:
            why = f"exited with code {code}"
        else:
            why = "stopped talking to its task"
        raise TFWorkerError(
            f"the TensorFlow worker process of rank {self.rank} {why}{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                lines = handle.read()[-8000:].decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"\nits log ends:\n{tail}" if tail else ""

    def stop(self) -> None:
        """End the process (at once, when it is still running) and close the pipes."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            self._messages.close()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()


def _results(work_dir: str) -> Iterator[pa.RecordBatch]:
    """Rank 0's results, from the files its worker wrote, as the stage's result rows."""
    for kind, name in (
        (ResultKind.HISTORY, "history.json"),
        (ResultKind.WEIGHTS, "weights.safetensors"),
        (ResultKind.METRICS, "metrics.json"),
    ):
        path = os.path.join(work_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as handle:
            blob = handle.read()
        for seq, start in enumerate(range(0, max(len(blob), 1), RESULT_CHUNK_BYTES)):
            yield pa.RecordBatch.from_pydict(
                {
                    "rank": [0],
                    "kind": [kind.value],
                    "seq": [seq],
                    "payload": [blob[start : start + RESULT_CHUNK_BYTES]],
                },
                schema=_RESULT_SCHEMA,
            )
