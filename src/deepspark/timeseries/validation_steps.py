"""Validation windows that continue the training data: inputs from the end of each training
series, labels from the validation steps only.

A validation split cut in time (`TSDataset.split`) holds only the steps after training. Rolled
alone, it needs ``lookback + horizon`` steps per series before it gives one window, which short
series cannot spare. Rolled after the training steps, every window whose forecast lies wholly
in validation counts: ``validation steps - horizon + 1`` windows per series, none of whose
labels were trained on.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from deepspark.timeseries.tsdataset import TSDataset

# the column of each series' last training step in `ContinuedValidation.ends` (Spark)
TRAIN_END = "__train_end__"
_FIRST = "__validation_first__"


class ContinuedValidation:
    """The training rows followed by the validation rows, per series; `windows` keeps the
    windows whose inputs end at or after the series' last training step."""

    def __init__(self, train: TSDataset, validation: TSDataset) -> None:
        self.cols = train.columns
        self.is_spark = train.is_spark
        if self.is_spark:
            combined, self.ends = _spark_continued(
                train.to_spark(), validation.to_spark(), self.cols
            )
        else:
            combined, self.ends = _pandas_continued(
                train.to_pandas(), validation.to_pandas(), self.cols
            )
        cols = self.cols
        build = TSDataset.from_spark if self.is_spark else TSDataset.from_pandas
        self.data = build(
            combined,
            dt_col=cols.dt_col,
            target_col=list(cols.target_col),
            id_col=cols.id_col,
            extra_feature_col=list(cols.feature_col) or None,
        )
        self.data.scaler = validation.scaler  # the rows are scaled already

    def windows(self, lookback: int, horizon: int) -> Any:
        rows = self.data.windows(lookback, horizon)
        dt_col, id_col = self.cols.dt_col, self.cols.id_col
        if self.is_spark:
            from pyspark.sql import functions as F

            if id_col is None:
                joined = rows.crossJoin(self.ends)
            else:
                joined = rows.join(F.broadcast(self.ends), id_col, "left")
            keep = F.col(TRAIN_END).isNull() | (F.col(dt_col) >= F.col(TRAIN_END))
            return joined.where(keep).drop(TRAIN_END)
        if id_col is None:
            keep = rows[dt_col] >= self.ends if pd.notna(self.ends) else rows[dt_col].notna()
            return rows[keep].reset_index(drop=True)
        ends = rows[id_col].map(self.ends)
        return rows[ends.isna() | (rows[dt_col] >= ends)].reset_index(drop=True)

    def window_counts(self, lookback: int, horizon: int) -> list[int]:
        """How many of `windows` each series has (one Spark aggregation)."""
        rows, id_col = self.windows(lookback, horizon), self.cols.id_col
        if self.is_spark:
            if id_col is None:
                return [rows.count()]
            return [row["count"] for row in rows.groupBy(id_col).count().collect()]
        if id_col is None:
            return [len(rows)]
        return rows.groupby(id_col).size().tolist()


def continued(train: TSDataset, validation: TSDataset) -> ContinuedValidation:
    """`validation` continuing `train` (both unrolled, scaled alike). Training rows at or after
    a series' first validation step are left out, so the two never overlap."""
    return ContinuedValidation(train, validation)


def check_pair(train: Any, validation: Any, caller: str) -> None:
    """Refuse a pair that cannot continue each other: not TSDatasets, or scaled unalike."""
    for name, data in (("train", train), ("validation_data", validation)):
        if not isinstance(data, TSDataset):
            raise TypeError(f"{caller}({name}=...) takes a TSDataset")
    unalike = validation.scaler is None or train.scaler is None
    if validation.scaler is not train.scaler and unalike:
        raise ValueError(
            f"{caller}: scale train and validation_data alike: "
            "train.scale('standard'); validation_data.scale(train.scaler, fit=False)"
        )


def _pandas_continued(
    train: pd.DataFrame, validation: pd.DataFrame, cols: Any
) -> tuple[pd.DataFrame, Any]:
    dt_col, id_col = cols.dt_col, cols.id_col
    if id_col is None:
        kept = train[train[dt_col] < validation[dt_col].min()]
        return pd.concat([kept, validation], ignore_index=True), kept[dt_col].max()
    first = validation.groupby(id_col)[dt_col].min()
    limit = train[id_col].map(first)
    kept = train[limit.isna() | (train[dt_col] < limit)]
    combined = pd.concat([kept, validation], ignore_index=True)
    return combined, kept.groupby(id_col)[dt_col].max()


def _spark_continued(train: Any, validation: Any, cols: Any) -> tuple[Any, Any]:
    from pyspark.sql import functions as F

    dt_col, id_col = cols.dt_col, cols.id_col
    if id_col is None:
        first = validation.agg(F.min(dt_col).alias(_FIRST))
        kept = train.crossJoin(first).where(F.col(dt_col) < F.col(_FIRST)).drop(_FIRST)
        ends = kept.agg(F.max(dt_col).alias(TRAIN_END))
    else:
        first = validation.groupBy(id_col).agg(F.min(dt_col).alias(_FIRST))
        kept = (
            train.join(first, id_col, "left")
            .where(F.col(_FIRST).isNull() | (F.col(dt_col) < F.col(_FIRST)))
            .drop(_FIRST)
        )
        ends = kept.groupBy(id_col).agg(F.max(dt_col).alias(TRAIN_END))
    return kept.unionByName(validation.select(*kept.columns)), ends
