"""Callbacks that write files from rank 0: the best-k weights files and a CSV log.

On a retry (``fit(max_failures=...)``) or a resume, each rank gets a fresh copy of the
driver's callback and training restarts at the epoch after the latest checkpoint. The files
follow the history: rows and weights of epochs trained after that checkpoint are dropped before
those epochs run again, so each epoch appears once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
import os
import uuid
from typing import TYPE_CHECKING, Any

import fsspec

from deepspark.training.callbacks.hooks import Callback, CallbackState
from deepspark.training.callbacks.monitoring import (
    beats,
    check_url,
    join_url,
    monitor_direction,
    monitored_value,
    read_text,
    remove_url,
    write_text,
)

if TYPE_CHECKING:
    pass

__all__ = ["CSVLogger", "ModelCheckpoint"]

_log = logging.getLogger(__name__)


class ModelCheckpoint(Callback):
    """Keep the weights of the best ``save_top_k`` epochs as safetensors files in a directory.

    Runs on rank 0. After each epoch whose monitored value is among the best ``save_top_k`` so
    far, the model's weights are written to ``dirpath/<filename>.safetensors``
    (:func:`deepspark.persist.weights.save_model_weights`); a file that falls out of the best
    k is deleted. ``dirpath`` holds an index, ``checkpoints.json``, from which the driver's
    object learns the result when the fit ends. A retry or resume continues the index (files
    of the epochs it trains again are deleted first); a new fit from epoch 0 starts its own
    and leaves files it did not write alone.

    Parameters
    ----------
    dirpath : str
        Directory, as a local path or fsspec URL that rank 0 can write (``s3://...``,
        ``hdfs://...``). The driver reads the index from it too: on a cluster give a shared
        store.
    monitor : str, default "val_loss"
        A key of the epoch record.
    mode : {"auto", "min", "max"}
        As for :class:`EarlyStopping`.
    save_top_k : int, default 1
        How many files to keep; ``-1`` keeps one per epoch, ``0`` none (with ``save_last``,
        only the last).
    filename : str
        A :meth:`str.format` template for the file name (without the ``.safetensors``
        suffix), given ``epoch``, ``monitor``, ``value`` (the monitored value) and every
        number of the epoch record by its name (``{val_accuracy:.3f}``).
    save_last : bool, default False
        Also write ``last.safetensors`` after every epoch.

    Attributes
    ----------
    best_model_path : str or None
        The best file; set on the driver's object when ``fit`` ends.
    best_score : float or None
    best_k_models : dict of str to float
        Every kept file and its monitored value, best first.
    last_model_path : str or None

    Examples
    --------
    >>> import torch
    >>> from deepspark.persist.weights import load_model_weights
    >>> from deepspark.training.callbacks import call_worker_hook
    >>> model = torch.nn.Linear(2, 1)
    >>> keeper = ModelCheckpoint("memory://doc-best", save_top_k=2, filename="epoch{epoch}")
    >>> call_worker_hook([keeper], "on_train_begin", CallbackState(0, 0, 0, 1, model=model))
    >>> for epoch, loss in enumerate([0.9, 0.5, 0.7, 0.8]):
    ...     logs = {"epoch": epoch, "val_loss": loss}
    ...     call_worker_hook([keeper], "on_epoch_end", CallbackState(epoch, 5, 0, 1, logs, model))
    >>> keeper.best_k_models
    {'memory://doc-best/epoch1.safetensors': 0.5, 'memory://doc-best/epoch2.safetensors': 0.7}
    >>> sorted(load_model_weights(keeper.best_model_path))
    ['bias', 'weight']
    """

    rank_zero_only = True
    INDEX_FILE = "checkpoints.json"
    LAST_FILE = "last.safetensors"

    def __init__(
        self,
        dirpath: str,
        monitor: str = "val_loss",
        mode: str = "auto",
        save_top_k: int = 1,
        filename: str = "epoch={epoch:03d}-{monitor}={value:.4f}",
        save_last: bool = False,
    ) -> None:
        if not isinstance(save_top_k, int) or isinstance(save_top_k, bool) or save_top_k < -1:
            raise ValueError(
                f"ModelCheckpoint: save_top_k={save_top_k!r}: give an int >= 0, or -1 for all"
            )
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"ModelCheckpoint: filename={filename!r}: give a format string")
        self.dirpath = os.fspath(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.filename = filename
        self.save_last = save_last
        self._direction = monitor_direction(monitor, mode)
        self._fit_id: str | None = None  # set on the driver: tells this fit's retries apart
        self._kept: list[dict[str, Any]] = []  # rank 0: {"path", "epoch", "score"}, best first
        self._take([], None)

    @property
    def _index_url(self) -> str:
        return join_url(self.dirpath, self.INDEX_FILE)

    def _take(self, kept: list[dict[str, Any]], last: str | None) -> None:
        """Set the public attributes from the kept files."""
        self.best_k_models = {entry["path"]: entry["score"] for entry in kept}
        self.best_model_path = kept[0]["path"] if kept else None
        self.best_score = kept[0]["score"] if kept else None
        self.last_model_path = last

    def _write_index(self) -> None:
        index = {
            "fit": self._fit_id,
            "monitor": self.monitor,
            "mode": self._direction,
            "models": self._kept,
            "best_model_path": self.best_model_path,
            "best_score": self.best_score,
            "last_model_path": self.last_model_path,
        }
        write_text(self._index_url, json.dumps(index, indent=1) + "\n")

    def _read_index(self) -> dict[str, Any] | None:
        text = read_text(self._index_url)
        return None if text is None else json.loads(text)

    # --- driver -----------------------------------------------------------------------------

    def on_fit_begin(self, params: dict[str, Any]) -> None:
        check_url("ModelCheckpoint", "dirpath", self.dirpath)
        self._fit_id = uuid.uuid4().hex
        self._kept = []
        self._take([], None)

    def on_fit_end(self, history: list[dict[str, Any]], error: BaseException | None) -> None:
        try:
            index = self._read_index()
        except OSError as error_reading:
            _log.warning("ModelCheckpoint: cannot read %s: %s", self._index_url, error_reading)
            return
        if index is None or index.get("fit") != self._fit_id:
            if history:
                _log.warning(
                    "ModelCheckpoint: the driver finds no index of this fit at %s; "
                    "best_model_path stays unset (give dirpath a store the driver shares)",
                    self._index_url,
                )
            return
        self._take(index["models"], index.get("last_model_path"))

    # --- rank 0 -----------------------------------------------------------------------------

    def on_train_begin(self, state: CallbackState) -> None:
        fs, root = fsspec.core.url_to_fs(self.dirpath)
        fs.makedirs(root, exist_ok=True)
        start = state.epoch  # 0, or the first epoch after a restored checkpoint
        index = self._read_index()
        kept: list[dict[str, Any]] = []
        stale: list[dict[str, Any]] = []  # trained after the restored checkpoint: trained again
        last = None
        # a resume continues the index; so does a retry of this fit, from any epoch
        continues = (
            index is not None
            and index.get("monitor") == self.monitor
            and index.get("mode") == self._direction
            and (start > 0 or index.get("fit") == self._fit_id)
        )
        if continues:
            assert index is not None
            last = index.get("last_model_path")
            for entry in index["models"]:
                (kept if entry["epoch"] < start else stale).append(entry)
        self._kept = kept
        self._take(kept, last)
        self._write_index()
        for entry in stale:
            remove_url(entry["path"])

    def on_epoch_end(self, state: CallbackState) -> None:
        score = monitored_value("ModelCheckpoint", self.monitor, state.logs)
        if state.model is None:
            raise ValueError("ModelCheckpoint: the callback state carries no model to save")
        from deepspark.persist.weights import save_model_weights, unwrap_model

        weights = unwrap_model(state.model).state_dict()
        dropped: list[dict[str, Any]] = []
        if self._qualifies(score):
            path = self._new_path(state.epoch, score, state.logs)
            save_model_weights(path, weights)
            self._kept.append({"path": path, "epoch": state.epoch, "score": score})
            # best first; on equal values the earlier epoch stays ahead
            self._kept.sort(
                key=lambda entry: -entry["score"] if self._direction == "max" else entry["score"]
            )
            if self.save_top_k >= 0:
                dropped = self._kept[self.save_top_k :]
                self._kept = self._kept[: self.save_top_k]
        last = self.last_model_path
        if self.save_last:
            last = join_url(self.dirpath, self.LAST_FILE)
            save_model_weights(last, weights)
        self._take(self._kept, last)
        self._write_index()  # before deleting: the index never names a missing file
        for entry in dropped:
            remove_url(entry["path"])

    def _qualifies(self, score: float) -> bool:
        if self.save_top_k == 0 or math.isnan(score):
            return False
        if self.save_top_k == -1 or len(self._kept) < self.save_top_k:
            return True
        return beats(score, self._kept[-1]["score"], self._direction)

    def _new_path(self, epoch: int, score: float, logs: dict[str, Any]) -> str:
        fields = {name: value for name, value in logs.items() if _is_number(value)}
        fields.update(epoch=epoch, monitor=self.monitor, value=score)
        try:
            stem = self.filename.format_map(fields)
        except (KeyError, ValueError, IndexError) as error:
            raise ValueError(
                f"ModelCheckpoint: filename={self.filename!r} cannot be formatted ({error}); "
                f"its fields may use {sorted(fields)}"
            ) from None
        taken = {entry["path"] for entry in self._kept}
        path, version = join_url(self.dirpath, f"{stem}.safetensors"), 0
        while path in taken:  # a template without {epoch} can repeat a kept name
            version += 1
            path = join_url(self.dirpath, f"{stem}-v{version}.safetensors")
        return path


# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    """A number as CSV text that reads back to the same value."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return repr(float(value))


class CSVLogger(Callback):
    """Write one CSV row per epoch with the numbers of its record, from rank 0.

    The columns are the first row's keys (``epoch``, ``train_loss``, ``val_loss``, ...), with
    any key a later row adds appended. The whole file is rewritten after every epoch, so it is
    complete and readable at any time, on any fsspec store.

    The file follows the fit's history: a fit that starts at epoch 0 starts the file afresh
    (unless ``append``); a retry or resume that restarts at epoch ``k`` keeps the file's rows
    and drops the last ones of epochs ``k`` and later, which it trains again.

    Parameters
    ----------
    path : str
        Local path or fsspec URL of the file, as rank 0 sees it.
    separator : str, default ","
        One character.
    append : bool, default False
        Keep the rows of an existing file and add this fit's after them.

    Examples
    --------
    >>> import fsspec
    >>> from deepspark.training.callbacks import call_worker_hook
    >>> logger = CSVLogger("memory://doc/log.csv")
    >>> call_worker_hook([logger], "on_train_begin", CallbackState(0, 0, 0, 1))
    >>> for epoch in range(2):
    ...     logs = {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "note": "text is left out"}
    ...     call_worker_hook([logger], "on_epoch_end", CallbackState(epoch, 5, 0, 1, logs))
    >>> print(fsspec.open("memory://doc/log.csv", "r").open().read(), end="")
    epoch,train_loss
    0,1.0
    1,0.5
    """

    rank_zero_only = True

    def __init__(self, path: str, separator: str = ",", append: bool = False) -> None:
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: separator={separator!r}: give one character")
        self.path = os.fspath(path)
        self.separator = separator
        self.append = append
        self._columns: list[str] = []
        self._rows: list[dict[str, str]] = []

    def on_fit_begin(self, params: dict[str, Any]) -> None:
        check_url("CSVLogger", "path", self.path)

    def on_train_begin(self, state: CallbackState) -> None:
        start = state.epoch  # 0, or the first epoch after a restored checkpoint
        self._columns, self._rows = [], []
        if start > 0 or self.append:
            text = read_text(self.path)
            if text:
                reader = csv.DictReader(io.StringIO(text), delimiter=self.separator)
                self._columns = list(reader.fieldnames or [])
                self._rows = [dict(row) for row in reader]
        if start > 0:
            while self._rows and _epoch_of(self._rows[-1]) >= start:
                self._rows.pop()  # trained after the restored checkpoint: trained again
        self._write()

    def on_epoch_end(self, state: CallbackState) -> None:
        row = {name: _cell(value) for name, value in state.logs.items() if _is_number(value)}
        self._columns += [name for name in row if name not in self._columns]
        self._rows.append(row)
        self._write()

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, self._columns, delimiter=self.separator, lineterminator="\n", restval=""
        )
        if self._columns:
            writer.writeheader()
        writer.writerows(self._rows)
        write_text(self.path, buffer.getvalue())


def _epoch_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("epoch") or "nan")
    except ValueError:
        return math.nan
