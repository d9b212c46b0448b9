"""A rank's stdout and stderr, line by line, to the driver (worker side; no pyspark).

`OutputRelay` reads lines from a process's output (a child's pipes, or this process's own file
descriptors 1 and 2 redirected for a while by `captured_output`) and sends each one to the
driver as an ``output`` event, which the driver prints with a rank prefix. Long logs are cut:
lines past ``max_chars`` are shortened, and after ``max_lines`` lines only a count goes on.
The last lines are kept either way, for the error report of a rank that fails.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["OutputRelay", "captured_output"]

TAIL_LINES = 40


class OutputRelay:
    """Send a rank's output lines to the driver, within a budget; keep the last few.

    Parameters
    ----------
    progress : ProgressClient or None
        Where ``{"kind": "output", "stream": ..., "line": ...}`` events go; ``None`` keeps the
        tail only.
    max_lines : int
        Lines sent per relay; the rest are counted (`cut`) and announced once at `close`.
    max_chars : int
        Longer lines are cut to this many characters.

    Examples
    --------
    >>> relay = OutputRelay(None, max_lines=1, max_chars=5)
    >>> relay.line("stdout", "hello world")
    >>> relay.line("stdout", "second")
    >>> relay.tail(), relay.cut
    (['hello…', 'secon…'], 1)
    """

    def __init__(self, progress: Any, *, max_lines: int, max_chars: int) -> None:
        self.progress = progress
        self.max_lines = max_lines
        self.max_chars = max_chars
        self.sent = 0
        self.cut = 0
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def line(self, stream: str, text: str) -> None:
        """Relay one line (without its newline)."""
        if len(text) > self.max_chars:
            text = text[: self.max_chars] + "…"
        with self._lock:
            self._tail.append(text)
            if self.sent >= self.max_lines:
                self.cut += 1
                return
            self.sent += 1
        if self.progress is not None:
            self.progress.send({"kind": "output", "stream": stream, "line": text})

    def follow(self, stream: str, source: IO[bytes]) -> None:
        """Relay every line of `source` on a background thread until it ends."""

        def read() -> None:
            with contextlib.suppress(OSError, ValueError):
                for raw in iter(source.readline, b""):
                    self.line(stream, raw.decode(errors="replace").rstrip("\r\n"))

        thread = threading.Thread(target=read, name=f"deepspark-{stream}-relay", daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout_s: float = 10.0) -> None:
        """Wait for the followed sources to end (their writers closed them)."""
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()

    def tail(self) -> list[str]:
        """The last lines seen (sent or cut), oldest first."""
        with self._lock:
            return list(self._tail)

    def close(self) -> None:
        """Say how many lines were cut, if any."""
        self.join()
        if self.cut and self.progress is not None:
            note = (
                f"… {self.cut} more line(s) of output not shown (the first {self.max_lines} "
                "were; see the executor's log, or raise ds.run(max_log_lines=...))"
            )
            self.progress.send({"kind": "output", "stream": "stderr", "line": note})


@contextlib.contextmanager
def captured_output(relay: OutputRelay) -> Iterator[None]:
    """Send what this process writes to file descriptors 1 and 2 through `relay` meanwhile.

    Works at the descriptor level, so output of C libraries (torch's gloo, NCCL) is caught as
    well as Python's ``print``. The descriptors are restored on exit, also after an error.
    """
    saved: list[tuple[int, int]] = []
    try:
        for descriptor, stream_name, stream in (
            (1, "stdout", sys.stdout),
            (2, "stderr", sys.stderr),
        ):
            with contextlib.suppress(Exception):
                stream.flush()
            read_end, write_end = os.pipe()
            saved.append((descriptor, os.dup(descriptor)))
            os.dup2(write_end, descriptor)
            os.close(write_end)
            relay.follow(stream_name, os.fdopen(read_end, "rb"))
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for descriptor, copy in saved:
            os.dup2(copy, descriptor)  # closes the pipe's last write end: the reader ends
            os.close(copy)
        relay.join()
