"""Anomaly detection over many time series: bounds or residual thresholds, an autoencoder over
rolled windows, and the residuals of any forecaster.

Every detector takes a pandas or Spark DataFrame in long format (``id_col``, ``dt_col``,
``target_col``; without ``id_col`` the frame is one series) or a ``TSDataset``, whose columns it
then uses. ``score`` returns the same kind of frame with three columns added: ``index`` (the
row's position in its series, in time order), ``score`` and ``anomaly`` (bool). On Spark the
work runs per series in ``groupBy(id).applyInPandas``; no series is collected to the driver.

Which scores count as anomalies is one rule per detector, applied to each series alone:
``ratio`` (that share of its highest scores), ``sigmas`` (above its median score by that many
robust standard deviations, 1.4826 x the median absolute deviation) or ``threshold`` (an
absolute score). Without a rule, ``ratio=0.01``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SCORE_COLUMNS = ("index", "score", "anomaly")
DEFAULT_RATIO = 0.01


@dataclass(frozen=True)
class Columns:
    """Where a frame keeps its series id (None: one series), timestamps and target."""

    dt_col: str
    target_col: str
    id_col: str | None
    feature_cols: tuple[str, ...] = ()


class AnomalyDetector:
    """What the detectors share: reading the input, thresholds, and the Spark plumbing."""

    def __init__(
        self,
        *,
        ratio: float | None,
        threshold: float | None,
        sigmas: float | None,
        dt_col: str,
        target_col: str,
        id_col: str | None,
    ) -> None:
        self.ratio = ratio
        self.threshold = threshold
        self.sigmas = sigmas
        self.dt_col = dt_col
        self.target_col = target_col
        self.id_col = id_col

    def _check_threshold(self) -> None:
        rules = {"ratio": self.ratio, "threshold": self.threshold, "sigmas": self.sigmas}
        if sum(value is not None for value in rules.values()) > 1:
            raise ValueError(
                "give one rule: ratio= (the share of points flagged per series), threshold= "
                "(an absolute score) or sigmas= (robust standard deviations above the series' "
                f"median score); got {rules}"
            )
        if self.sigmas is not None and not self.sigmas > 0:
            raise ValueError(f"sigmas={self.sigmas!r}: give a positive number")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio!r}: give the share flagged, in (0, 1)")

    def _frame(self, data: Any) -> tuple[Any, Columns, bool]:
        """The input as a pandas or Spark DataFrame, its columns, and whether it is Spark."""
        if hasattr(data, "target_col") and hasattr(data, "to_pandas"):  # a TSDataset
            targets = list(data.target_col)
            if len(targets) != 1:
                raise ValueError(
                    f"anomaly detection scores one target; the dataset has {targets}: "
                    "build one TSDataset per target"
                )
            columns = Columns(data.dt_col, targets[0], data.id_col, tuple(data.feature_col))
            frame = data.to_spark() if data.is_spark else data.to_pandas()
        else:
            columns = Columns(self.dt_col, self.target_col, self.id_col)
            frame = data
        is_spark = not isinstance(frame, pd.DataFrame)
        if is_spark and not hasattr(frame, "groupBy"):
            raise TypeError(
                f"data is a {type(data).__name__}: give a pandas DataFrame, a Spark DataFrame "
                "or a TSDataset"
            )
        present = list(frame.columns)
        for argument, name in (
            ("dt_col", columns.dt_col),
            ("target_col", columns.target_col),
            ("id_col", columns.id_col),
        ):
            if name is not None and name not in present:
                raise ValueError(f"{argument}={name!r} is not a column of data; it has {present}")
        return frame, columns, is_spark

    def _rule(self) -> tuple[float | None, float | None, float | None]:
        """(ratio, threshold, sigmas): at most one set; none means ratio 0.01."""
        if self.ratio is None and self.threshold is None and self.sigmas is None:
            return DEFAULT_RATIO, None, None
        return self.ratio, self.threshold, self.sigmas

    def _extra_columns(self) -> list[str]:
        """Input columns besides id, time and target that scoring reads."""
        return []

    def _series_function(self, columns: Columns):
        """A picklable function from one series' pandas frame to its scores (in time order)."""
        raise NotImplementedError

    def score(self, data: Any) -> Any:
        """Score every point; higher is more anomalous.

        Returns
        -------
        pandas or Spark DataFrame
            The input's id, timestamp and target columns, plus ``index``, ``score``,
            ``anomaly``; Spark in, Spark out.
        """
        self._check_threshold()
        frame, columns, is_spark = self._frame(data)
        score_series = self._series_function(columns)
        ratio, threshold, sigmas = self._rule()

        def per_series(series: pd.DataFrame) -> pd.DataFrame:
            series = series.sort_values(columns.dt_col, kind="stable").reset_index(drop=True)
            scores = np.asarray(score_series(series), dtype=np.float64)
            cut = _cut(scores, ratio, threshold, sigmas)
            series["index"] = np.arange(len(series), dtype=np.int64)
            series["score"] = scores
            series["anomaly"] = np.nan_to_num(scores, nan=-np.inf) > cut
            return series

        keep = [c for c in (columns.id_col, columns.dt_col, columns.target_col) if c]
        keep += list(columns.feature_cols)
        for name in self._extra_columns():
            if name not in frame.columns:
                raise ValueError(f"{name!r} is not a column of data; it has {list(frame.columns)}")
            keep.append(name)
        frame = frame.select(*keep) if is_spark else frame[keep]
        if is_spark:
            return _score_spark(frame, columns, per_series)
        if columns.id_col is None:
            return per_series(frame.copy())
        parts = [per_series(part) for _, part in frame.groupby(columns.id_col, sort=True)]
        return pd.concat(parts, ignore_index=True)

    def anomaly_indices(self, data: Any) -> Any:
        """The anomalous points of each series.

        Returns
        -------
        dict, numpy.ndarray or Spark DataFrame
            pandas input: ``{series id: positions}`` (an array of positions in time order when
            the frame has no id column). Spark input: a DataFrame of the anomalous rows only,
            with ``index`` and ``score``.
        """
        scored = self.score(data)
        id_col = self._frame(data)[1].id_col
        if not isinstance(scored, pd.DataFrame):
            return scored.filter(scored["anomaly"])
        flagged = scored[scored["anomaly"]]
        if id_col is None:
            return flagged["index"].to_numpy()
        return {
            key: flagged.loc[flagged[id_col] == key, "index"].to_numpy()
            for key in scored[id_col].unique()
        }


def _cut(
    scores: np.ndarray, ratio: float | None, threshold: float | None, sigmas: float | None
) -> float:
    """The score above which a point of this series is an anomaly."""
    if np.isnan(scores).all():
        return np.inf
    if ratio is not None:
        return float(np.nanquantile(scores, 1.0 - ratio))
    if sigmas is not None:
        centre = np.nanmedian(scores)
        spread = 1.4826 * np.nanmedian(np.abs(scores - centre)) or np.nanstd(scores)
        return float(centre + sigmas * spread)
    return float(threshold)


def _score_spark(frame: Any, columns: Columns, per_series) -> Any:
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, DoubleType, LongType, StructField, StructType

    fields = [frame.schema[c] for c in frame.columns]
    schema = StructType(
        [
            *fields,
            StructField("index", LongType()),
            StructField("score", DoubleType()),
            StructField("anomaly", BooleanType()),
        ]
    )
    if columns.id_col is None:
        return frame.groupBy(F.lit("series")).applyInPandas(per_series, schema)
    return frame.groupBy(columns.id_col).applyInPandas(per_series, schema)


class ThresholdDetector(AnomalyDetector):
    """Flag values outside fixed bounds, or the largest residuals.

    With ``min``/``max``, a point's score is how far it lies outside the bounds and every point
    outside is an anomaly. With ``ratio``, the score is the absolute residual from
    ``forecast_col`` (a column of forecasts in the data), or from the series' median when no
    forecast is given, and the ``ratio`` share of largest residuals per series is flagged;
    ``threshold`` flags residuals above an absolute value instead.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"ds": range(6), "y": [1.0, 1.2, 9.0, 1.1, -5.0, 1.0]})
    >>> ThresholdDetector(min=0, max=5).anomaly_indices(frame)
    array([2, 4])
    """

    def __init__(
        self,
        min: float | None = None,
        max: float | None = None,
        ratio: float | None = None,
        *,
        threshold: float | None = None,
        sigmas: float | None = None,
        forecast_col: str | None = None,
        dt_col: str = "ds",
        target_col: str = "y",
        id_col: str | None = None,
    ) -> None:
        super().__init__(
            ratio=ratio,
            threshold=threshold,
            sigmas=sigmas,
            dt_col=dt_col,
            target_col=target_col,
            id_col=id_col,
        )
        self.min = min
        self.max = max
        self.forecast_col = forecast_col

    def _check_threshold(self) -> None:
        bounded = self.min is not None or self.max is not None
        residual_rule = (self.ratio, self.threshold, self.sigmas)
        if bounded and any(value is not None for value in residual_rule):
            raise ValueError(
                "give either bounds (min=, max=) or a residual rule (ratio=, threshold= or "
                "sigmas=), not both"
            )
        super()._check_threshold()
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} is above max={self.max}")

    def fit(self, data: Any) -> ThresholdDetector:
        """Nothing to learn: checks the rule and the columns. Returns self."""
        self._check_threshold()
        self._frame(data)
        return self

    def _rule(self) -> tuple[float | None, float | None, float | None]:
        if self.min is None and self.max is None:
            return super()._rule()
        return None, 0.0, None

    def _extra_columns(self) -> list[str]:
        return [] if self.forecast_col is None else [self.forecast_col]

    def _series_function(self, columns: Columns):
        low, high, target, forecast = self.min, self.max, columns.target_col, self.forecast_col

        def bounds_or_residual(series: pd.DataFrame) -> np.ndarray:
            values = series[target].to_numpy(np.float64)
            if low is None and high is None:
                centre = np.nanmedian(values) if forecast is None else series[forecast]
                return np.abs(values - np.asarray(centre, dtype=np.float64))
            below = (low - values) if low is not None else np.zeros_like(values)
            above = (values - high) if high is not None else np.zeros_like(values)
            return np.maximum(np.maximum(below, above), 0.0)

        return bounds_or_residual
