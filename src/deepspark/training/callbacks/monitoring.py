"""What the built-in callbacks share: the monitored value and its direction, and small
reads and writes of files at fsspec URLs (local paths, HDFS, S3, ...)."""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "beats",
    "check_url",
    "join_url",
    "monitor_direction",
    "monitored_value",
    "read_text",
    "remove_url",
    "write_text",
]

_MODES = ("auto", "min", "max")
# "auto" maximises a monitor whose name contains one of these; it minimises anything else
_HIGHER_IS_BETTER = ("accuracy", "auc", "f1", "precision", "recall", "r2")


def monitor_direction(monitor: str, mode: str) -> str:
    """``"min"`` or ``"max"``: how ``monitor`` improves under ``mode``."""
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: give 'auto', 'min' or 'max'")
    if mode != "auto":
        return mode
    name = monitor.lower()
    return "max" if any(word in name for word in _HIGHER_IS_BETTER) else "min"


def beats(value: float, reference: float | None, direction: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` is better than ``reference`` by more than ``min_delta`` (NaN never is)."""
    if math.isnan(value):
        return False
    if reference is None:
        return True
    if direction == "min":
        return value < reference - min_delta
    return value > reference + min_delta


def monitored_value(owner: str, monitor: str, logs: dict[str, Any]) -> float:
    if monitor not in logs:
        hint = ""
        if monitor.startswith("val_") and not any(key.startswith("val_") for key in logs):
            hint = "; validation values need fit(validation_data=...)"
        raise ValueError(
            f"{owner}: monitor={monitor!r} is not in this epoch's record, which has "
            f"{sorted(logs)}{hint}"
        )
    return float(logs[monitor])


def join_url(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def write_text(url: str, text: str) -> None:
    """Replace the file at ``url`` with ``text`` whole: a local file is written under another
    name and renamed into place; other stores write one object, all or nothing."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path.rstrip("/"))
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        staging = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(staging, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(staging, path)
    else:
        fs.pipe_file(path, text.encode("utf-8"))


def read_text(url: str) -> str | None:
    """The file's text, or None when there is no file."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return handle.read().decode("utf-8")


def remove_url(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def check_url(owner: str, argument: str, url: str) -> None:
    try:
        fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as error:
        raise ValueError(
            f"{owner}: {argument}={url!r} is not a path fsspec can open: {error}"
        ) from error


# ---------------------------------------------------------------------------------------------
