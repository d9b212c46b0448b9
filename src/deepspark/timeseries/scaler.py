"""Scaling statistics of a TSDataset's columns, per series or over all series.

The statistics are small (one row per series, one column per value column), so they live on
the driver as pandas frames and travel inside task closures; the data itself never leaves the
workers. No pyspark here: `transform` and `inverse` run inside Spark tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

SCALER_KINDS = ("standard", "minmax")
ALL_SERIES = "__all__"  # the one row of a global scaler
STAT_COL = "__stat__"


def series_stats(frame: pd.DataFrame, columns: Sequence[str], kind: str) -> pd.DataFrame:
    """Center and scale of each column over `frame`'s rows: a two-row frame ("center",
    "scale"). Standard: mean and population standard deviation; minmax: min and max - min.
    A constant column gets scale 1, so it maps to 0 instead of dividing by zero."""
    values = frame[list(columns)].astype("float64")
    if kind == "standard":
        center, spread = values.mean(), values.std(ddof=0)
    else:
        center, spread = values.min(), values.max() - values.min()
    spread = spread.where(spread > 0, 1.0).fillna(1.0)
    stats = pd.DataFrame([center.to_numpy(), spread.to_numpy()], columns=list(columns))
    stats.insert(0, STAT_COL, ["center", "scale"])
    return stats


@dataclass
class TSScaler:
    """Fitted scaling of a TSDataset: ``(value - center) / scale`` for each column.

    ``per_id=True`` keeps one center and scale per series (the default for data with an id
    column: a global model sees every series on the same scale); ``per_id=False`` one pair
    over all rows. Fit on the training split, then reuse on validation and test:
    ``val.scale(train.scaler, fit=False)``.
    """

    kind: str
    per_id: bool
    columns: tuple[str, ...]
    center: pd.DataFrame = field(repr=False)  # index: series ids (or ALL_SERIES); columns
    scale: pd.DataFrame = field(repr=False)

    # --- applying -------------------------------------------------------------------------

    def _rows(self, table: pd.DataFrame, ids: Any, columns: Sequence[str]) -> np.ndarray:
        keys = pd.Index(np.asarray(ids))
        missing = keys.difference(table.index)
        if len(missing):
            raise ValueError(
                f"the scaler has no statistics for series {list(missing[:5])}: it was fit on "
                "other series; fit it on data that holds every series (per_id=True) or use "
                "scale(..., per_id=False)"
            )
        return table.loc[keys, list(columns)].to_numpy()

    def factors(self, ids: Any, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(center, scale) for each id in `ids` (rows) and each of `columns`."""
        if not self.per_id:
            center = self.center.loc[[ALL_SERIES], list(columns)].to_numpy()
            scale = self.scale.loc[[ALL_SERIES], list(columns)].to_numpy()
            count = len(np.asarray(ids)) if ids is not None else 1
            return np.repeat(center, count, axis=0), np.repeat(scale, count, axis=0)
        return self._rows(self.center, ids, columns), self._rows(self.scale, ids, columns)

    def transform(self, frame: pd.DataFrame, id_col: str | None) -> pd.DataFrame:
        ids = frame[id_col].to_numpy() if self.per_id else None
        center, scale = self.factors(ids if self.per_id else np.zeros(len(frame)), self.columns)
        frame = frame.copy()
        frame[list(self.columns)] = (frame[list(self.columns)].to_numpy("float64") - center) / scale
        return frame

    def inverse(
        self, frame: pd.DataFrame, id_col: str | None, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        columns = list(self.columns if columns is None else columns)
        ids = frame[id_col].to_numpy() if self.per_id else np.zeros(len(frame))
        center, scale = self.factors(ids, columns)
        frame = frame.copy()
        frame[columns] = frame[columns].to_numpy("float64") * scale + center
        return frame

    def inverse_windows(self, values: np.ndarray, ids: Any, columns: Sequence[str]) -> np.ndarray:
        """Unscale windows of shape (windows, steps, len(columns)), one id per window."""
        count = len(values)
        center, scale = self.factors(ids if self.per_id else np.zeros(count), columns)
        return values.astype("float64") * scale[:, None, :] + center[:, None, :]

    # --- persistence ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ids become ``[id, values...]`` rows, so non-string ids survive."""
        return {
            "kind": self.kind,
            "per_id": self.per_id,
            "columns": list(self.columns),
            "center": [
                [key, *row]
                for key, row in zip(self.center.index, self.center.values.tolist(), strict=False)
            ],
            "scale": [
                [key, *row]
                for key, row in zip(self.scale.index, self.scale.values.tolist(), strict=False)
            ],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TSScaler:
        def table(rows: list[list[Any]]) -> pd.DataFrame:
            return pd.DataFrame(
                [row[1:] for row in rows],
                index=[_plain(row[0]) for row in rows],
                columns=state["columns"],
            )

        return cls(
            kind=state["kind"],
            per_id=state["per_id"],
            columns=tuple(state["columns"]),
            center=table(state["center"]),
            scale=table(state["scale"]),
        )


def _plain(key: Any) -> Any:
    return key.item() if isinstance(key, np.generic) else key


def scaler_from_stats(
    kind: str, per_id: bool, columns: Sequence[str], stats: pd.DataFrame, key_col: str | None
) -> TSScaler:
    """A scaler from `series_stats` rows stacked over series, each tagged with its id in
    `key_col` (``None``: one global pair of rows)."""
    if key_col is None:
        stats = stats.assign(__key__=ALL_SERIES)
        key_col = "__key__"
    tables = []
    for stat in ("center", "scale"):
        table = stats[stats[STAT_COL] == stat].set_index(key_col)[list(columns)]
        table.index = [_plain(value) for value in table.index]
        tables.append(table.sort_index().astype("float64"))
    return TSScaler(kind, per_id, tuple(columns), tables[0], tables[1].loc[tables[0].index])
