"""Training progress shown on the driver (driver side; no pyspark, no torch).

:class:`ProgressBar` is a sink for the events a
:class:`~deepspark.training.progress.ProgressServer` receives: a tqdm bar per epoch on a
terminal or in a notebook, and one line per finished epoch, log and error everywhere.
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any

__all__ = ["ProgressBar"]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# Log events that carry the driver's bookkeeping (rank 0's timeline, the rendezvous port), not
# a message for the user: they are kept by the progress server, not printed.
_BOOKKEEPING = frozenset({"timeline", "rendezvous_port"})


class ProgressBar:
    """A :class:`~deepspark.training.progress.ProgressServer` sink showing training on the driver.

    On a terminal (or in a notebook) a tqdm bar per epoch shows the step, loss and samples/s
    of rank 0; elsewhere (logs, CI) nothing is written per step. Either way one line is written
    per finished epoch with its metrics, and ``log`` and ``error`` events are written with
    their rank.

    Parameters
    ----------
    epochs : int, optional
        Total epochs, shown as ``epoch 2/5``; taken from step events when omitted.
    file : text stream, optional
        Where to write; ``sys.stderr`` by default.
    use_tqdm : bool, optional
        Force the bar on or off; by default on when ``file`` is a terminal or in a notebook.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(epochs=2, file=out, use_tqdm=False)
    >>> bar({"kind": "epoch", "rank": 0, "epoch": 0, "metrics": {"train_loss": 0.51234}})
    >>> out.getvalue()
    'epoch 1/2: train_loss=0.5123\\n'
    """

    def __init__(
        self, epochs: int | None = None, file: IO[str] | None = None, use_tqdm: bool | None = None
    ) -> None:
        self.epochs = epochs
        self.file = file
        self.use_tqdm = use_tqdm
        self._bar: Any = None
        self._bar_epoch: int | None = None

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _tqdm_wanted(self) -> bool:
        if self.use_tqdm is not None:
            return self.use_tqdm
        stream = self._stream()
        is_tty = getattr(stream, "isatty", None)
        return bool(is_tty and is_tty()) or "ipykernel" in sys.modules

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self._stream())
        else:
            self._stream().write(line + "\n")
            self._stream().flush()

    def _title(self, epoch: int) -> str:
        return f"epoch {epoch + 1}/{self.epochs}" if self.epochs else f"epoch {epoch + 1}"

    def __call__(self, event: dict[str, Any]) -> None:
        """Show one event."""
        kind, rank = event.get("kind"), event.get("rank", 0)
        if kind == "step" and rank == 0:
            self.epochs = self.epochs or event.get("epochs")
            if self._tqdm_wanted():
                self._show_step(event)
        elif kind == "epoch":
            self._close_bar()
            metrics = event.get("metrics") or {}
            shown = ", ".join(
                f"{name}={_format_value(value)}"
                for name, value in metrics.items()
                if name != "epoch"
            )
            self._write(f"{self._title(int(event.get('epoch', 0)))}: {shown}")
        elif kind == "log" and not _BOOKKEEPING.intersection(event):
            self._write(f"[rank {rank}] {event.get('text', '')}")
        elif kind == "error":
            self._write(f"[rank {rank}] failed: {event.get('error', '')}")

    def _show_step(self, event: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        epoch = int(event.get("epoch", 0))
        if self._bar is None or self._bar_epoch != epoch:
            self._close_bar()
            self._bar = tqdm(
                total=event.get("steps"),
                desc=self._title(epoch),
                file=self._stream(),
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )
            self._bar_epoch = epoch
        step = int(event.get("step", 0))
        self._bar.update(max(0, step - self._bar.n))
        postfix = {}
        if "loss" in event:
            postfix["loss"] = _format_value(float(event["loss"]))
        if "samples_per_s" in event:
            postfix["samples/s"] = f"{float(event['samples_per_s']):.0f}"
        self._bar.set_postfix(postfix, refresh=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_epoch = None, None

    def close(self) -> None:
        """Close the bar, if one is open (after the server has stopped)."""
        self._close_bar()
