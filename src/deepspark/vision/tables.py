"""Writing and reading the pipeline's tables: Delta when delta-spark is installed and the
session has its extension, Parquet otherwise (driver side)."""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["read_table", "table_format", "write_table"]

_FORMATS = ("auto", "parquet", "delta")


def table_format(spark: Any, format: str = "auto") -> str:
    """``"delta"`` or ``"parquet"``: what ``format="auto"`` resolves to in this session."""
    if format not in _FORMATS:
        raise ValueError(f"format={format!r}: use one of {list(_FORMATS)}")
    delta_ready = importlib.util.find_spec(
        "delta"
    ) is not None and "DeltaSparkSessionExtension" in (
        spark.conf.get("spark.sql.extensions", "") or ""
    )
    if format == "delta" and not delta_ready:
        raise ImportError(
            "format='delta' needs delta-spark and a session with its extension: run "
            "`pip install 'deepspark[delta]'` and start the session with "
            "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension"
        )
    if format == "auto":
        return "delta" if delta_ready else "parquet"
    return format


def write_table(frame: Any, path: str, *, format: str = "auto", mode: str = "overwrite") -> str:
    """Write ``frame`` at ``path`` (Spark's own writer, so retried tasks never duplicate rows)
    and return the format used."""
    chosen = table_format(frame.sparkSession, format)
    frame.write.format(chosen).mode(mode).save(path)
    return chosen


def read_table(spark: Any, path: str, *, format: str = "auto") -> Any:
    """Read a table written by :func:`write_table` (a Delta table when it has a ``_delta_log``)."""
    import os

    chosen = format
    if format == "auto":
        chosen = "delta" if os.path.isdir(os.path.join(path, "_delta_log")) else "parquet"
    return spark.read.format(chosen).load(path)
