"""The process that runs one worker of ``tf.distribute.MultiWorkerMirroredStrategy``.

Rank side; no pyspark here. Each Spark task of a Keras TensorFlow-backend job starts one of
these (`deepspark.training.rank._tf_rank`) and talks to it over two pipes: the task writes the
job (a `_tf_rank.WorkerJob`, cloudpickled) to the process's stdin once the ranks have met; the
process writes JSON lines back on a file descriptor of its own (its stdout and stderr go to a
log file, so that nothing TensorFlow or the user's code prints can be taken for a message).

Why a process of its own: once a peer fails, TensorFlow aborts the collectives of the whole
process for good ("Restart your program to reset"); a process joins one TensorFlow cluster
only; and Spark reuses its Python workers from job to job. A fresh process per task starts
every attempt clean, and gives TensorFlow's ~600 MB back when the task ends. It dies with the
task (``PR_SET_PDEATHSIG``), so a killed Spark task never leaves it behind.

Messages to the task: ``{"kind": "imported"}``, ``{"kind": "ready"}`` (the cluster is formed),
``{"kind": "progress", "event": {...}}`` (relayed to the driver), ``{"kind": "error", "error":
..., "traceback": ...}`` and ``{"kind": "done", "marks": {...}}`` (results are in the job's
``output_dir``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

__all__ = ["main"]


class _Messages:
    """JSON lines to the task, on the descriptor it gave; thread-safe, never raises."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=_jsonable)
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._file.write(line + "\n")
            self._file.flush()

    def progress(self, event: dict[str, Any]) -> None:
        self.send({"kind": "progress", "event": event})


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the task's process dies (no orphans)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _read_job(stream) -> Any:
    """The job the task sends on stdin: 8 bytes of length, then the cloudpickled job."""
    import cloudpickle

    header = stream.read(8)
    if len(header) < 8:
        return None  # the task ended before the ranks met: nothing to do
    size = int.from_bytes(header, "big")
    data = stream.read(size)
    if len(data) < size:
        return None
    return cloudpickle.loads(data)


def main(argv: list[str] | None = None) -> int:
    """``python -m deepspark.training.rank._tf_worker MESSAGE_FD PARENT_PID``."""
    argv = sys.argv[1:] if argv is None else argv
    messages = _Messages(int(argv[0]))
    _die_with_parent(int(argv[1]))
    from deepspark.persist.keras_files import import_keras

    try:
        import_keras("tensorflow")  # sets KERAS_BACKEND and quiets TensorFlow first
        messages.send({"kind": "imported"})
        job = _read_job(sys.stdin.buffer)
        if job is None:
            return 0
        os.environ["TF_CONFIG"] = json.dumps(job.tf_config)
        from deepspark.training.rank._tf_loop import TFTrainer

        trainer = TFTrainer(job, messages)
        messages.send({"kind": "ready"})
        trainer.run()
        messages.send({"kind": "done", "marks": {**job.marks, **trainer.marks}})
        return 0
    except BaseException as error:
        messages.send(
            {
                "kind": "error",
                "error": f"{type(error).__name__}: {_first_lines(error)}",
                "traceback": traceback.format_exc()[-4000:],
                "time": time.time(),
            }
        )
        return 1


def _first_lines(error: BaseException, lines: int = 6) -> str:
    text = str(error).strip()
    return "\n".join(text.splitlines()[:lines]) if text else "(no message)"


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # TensorFlow's collective runtime can hold the interpreter's exit on a lost peer: the
    # results are written and the task told, so leave now.
    os._exit(code)
