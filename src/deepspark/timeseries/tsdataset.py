"""TSDataset: many time series in long format (id, timestamp, targets, extra features).

The same object wraps a pandas DataFrame or a Spark DataFrame. With pandas, each step runs
per series with ``groupby``; with Spark, each step runs per series inside
``groupBy(id).applyInPandas`` (or row-wise in ``mapInPandas``, or as window functions) and
nothing but small summaries ever reaches the driver. Both run the same per-series functions
(`series_ops`, `windows`, `scaler`), so they give the same rows and the same windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from deepspark.timeseries import series_ops, tsdataset_pandas, windows
from deepspark.timeseries.scaler import SCALER_KINDS, TSScaler
from deepspark.timeseries.series_ops import SeriesColumns
from deepspark.timeseries.windows import WindowSpec


class TSDataset:
    """Time series in long format, from pandas or Spark, ready for a Forecaster.

    Build one with `from_pandas` or `from_spark`. The cleaning and feature methods change the
    dataset in place and return it, so they chain. `roll` cuts the windows a model trains on.

    Attributes
    ----------
    dt_col : str
    target_col : list of str
    id_col : str or None
    feature_col : list of str
        Extra features, including generated ones.
    scaler : TSScaler or None
        Set by `scale`.
    is_spark : bool
    freq : str or None
        The interval (a pandas offset alias), inferred on first use (a small Spark job for
        Spark data) or set by `resample`.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"dt": pd.date_range("2024-01-01", periods=6, freq="D"),
    ...                       "y": [1.0, None, 3.0, 4.0, 5.0, 6.0]})
    >>> data = TSDataset.from_pandas(frame, dt_col="dt", target_col="y").impute("linear")
    >>> x, y = data.roll(lookback=3, horizon=1).to_numpy()
    >>> x.shape, y.shape, float(x[0, 1, 0])
    ((3, 3, 1), (3, 1, 1), 2.0)
    """

    def __init__(self, data: Any, cols: SeriesColumns, *, is_spark: bool) -> None:
        self._data = data
        # Spark: per-series steps wait here and run together, in one grouped pass, when a
        # job needs the rows (one shuffle instead of one per step).
        self._pending: list[Callable[[pd.DataFrame], pd.DataFrame]] = []
        self._source_cols = cols
        self._cols = cols
        self.is_spark = is_spark
        self.scaler: TSScaler | None = None
        self._freq: str | None = None
        self._rolled: Any = None
        self._window: WindowSpec | None = None

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_pandas(
        cls,
        df: pd.DataFrame,
        *,
        dt_col: str,
        target_col: str | Sequence[str],
        id_col: str | None = None,
        extra_feature_col: str | Sequence[str] | None = None,
        with_split: bool = False,
        val_ratio: float = 0.0,
        test_ratio: float = 0.1,
    ) -> TSDataset | tuple[TSDataset, TSDataset, TSDataset]:
        """A dataset over a pandas DataFrame in long format (one row per id and timestamp).

        With ``with_split=True``: (train, val, test), each series cut in time order, its last
        ``test_ratio`` of rows to test and the ``val_ratio`` before them to validation.
        """
        cols = series_ops.series_columns(dt_col, target_col, id_col, extra_feature_col)
        frame = tsdataset_pandas.prepare(df, cols)
        data = cls(frame, cols, is_spark=False)
        return data.split(val_ratio, test_ratio) if with_split else data

    @classmethod
    def from_spark(
        cls,
        sdf: Any,
        *,
        dt_col: str,
        target_col: str | Sequence[str],
        id_col: str | None = None,
        extra_feature_col: str | Sequence[str] | None = None,
        with_split: bool = False,
        val_ratio: float = 0.0,
        test_ratio: float = 0.1,
    ) -> TSDataset | tuple[TSDataset, TSDataset, TSDataset]:
        """A dataset over a Spark DataFrame: the same arguments as `from_pandas`. Columns and
        types are checked on the driver without a job; every later step stays in Spark."""
        from deepspark.timeseries import tsdataset_spark

        cols = series_ops.series_columns(dt_col, target_col, id_col, extra_feature_col)
        data = cls(tsdataset_spark.prepare(sdf, cols), cols, is_spark=True)
        return data.split(val_ratio, test_ratio) if with_split else data

    def split(self, val_ratio: float = 0.0, test_ratio: float = 0.1):
        """(train, val, test) datasets: every series cut in time order by the ratios."""
        series_ops.check_ratios(val_ratio, test_ratio)
        if self.is_spark:
            from deepspark.timeseries import tsdataset_spark

            parts = tsdataset_spark.split(self._spark_rows(), self._cols, val_ratio, test_ratio)
        else:
            parts = tsdataset_pandas.split(self._data, self._cols, val_ratio, test_ratio)
        return tuple(self._derived(part) for part in parts)

    def _derived(self, data: Any) -> TSDataset:
        twin = TSDataset(data, self._cols, is_spark=self.is_spark)
        twin.scaler, twin._freq = self.scaler, self._freq
        return twin

    # --- attributes -----------------------------------------------------------------------

    @property
    def dt_col(self) -> str:
        return self._cols.dt_col

    @property
    def target_col(self) -> list[str]:
        return list(self._cols.target_col)

    @property
    def id_col(self) -> str | None:
        return self._cols.id_col

    @property
    def feature_col(self) -> list[str]:
        return list(self._cols.feature_col)

    @property
    def columns(self) -> SeriesColumns:
        """The column roles, as one small picklable value."""
        return self._cols

    @property
    def freq(self) -> str | None:
        if self._freq is None:
            if self.is_spark:
                from deepspark.timeseries import tsdataset_spark

                self._freq = tsdataset_spark.infer_freq(self._spark_rows(), self._cols)
            else:
                self._freq = tsdataset_pandas.infer_freq(self._data, self._cols)
        return self._freq

    # --- per-series steps -----------------------------------------------------------------

    def _per_series(
        self, step: Callable[[pd.DataFrame], pd.DataFrame], out_cols: SeriesColumns | None = None
    ) -> TSDataset:
        out_cols = out_cols or self._cols
        if self.is_spark:
            self._pending.append(step)
        else:
            self._data = tsdataset_pandas.per_series(self._data, self._cols, step, out_cols)
        self._cols = out_cols
        self._rolled = self._window = None
        return self

    def impute(self, mode: str = "last", const_num: float = 0.0) -> TSDataset:
        """Fill missing values in each series: ``"last"`` (the last value seen; leading gaps
        take the first), ``"const"`` (`const_num`), or ``"linear"`` (in time)."""
        if mode not in series_ops.IMPUTE_MODES:
            raise ValueError(f"impute(mode={mode!r}): choose from {series_ops.IMPUTE_MODES}")
        cols = self._cols
        return self._per_series(lambda frame: series_ops.impute(frame, cols, mode, const_num))

    def deduplicate(self) -> TSDataset:
        """One row per id and timestamp: rows that share one become their mean."""
        cols = self._cols
        return self._per_series(lambda frame: series_ops.deduplicate(frame, cols))

    def resample(self, interval: str, merge_mode: str = "mean") -> TSDataset:
        """Put each series on a regular `interval` grid (a pandas offset alias: ``"h"``,
        ``"15min"``, ``"D"``, ``"MS"``); rows in one bin merge by `merge_mode`, empty bins
        become missing values (follow with `impute`)."""
        if merge_mode not in series_ops.MERGE_MODES:
            raise ValueError(
                f"resample(merge_mode={merge_mode!r}): choose from {series_ops.MERGE_MODES}"
            )
        try:
            pd.tseries.frequencies.to_offset(interval)
        except ValueError as error:
            raise ValueError(
                f"resample(interval={interval!r}) is not a pandas offset alias, e.g. 'h', "
                "'15min', 'D', 'MS'"
            ) from error
        cols = self._cols
        self._per_series(lambda frame: series_ops.resample(frame, cols, interval, merge_mode))
        self._freq = interval
        return self

    def repair_abnormal_data(self, mode: str = "last", threshold: float = 3.0) -> TSDataset:
        """Replace target values more than `threshold` standard deviations from their series'
        mean, by the last normal value (``"last"``) or the normal values' mean (``"mean"``)."""
        if mode not in series_ops.REPAIR_MODES:
            raise ValueError(
                f"repair_abnormal_data(mode={mode!r}): choose from {series_ops.REPAIR_MODES}"
            )
        cols = self._cols
        return self._per_series(
            lambda frame: series_ops.repair_abnormal(frame, cols, mode, threshold)
        )

    def gen_dt_feature(self, features: Sequence[str] | None = None) -> TSDataset:
        """Add calendar features of the timestamp as extra features (default: all of
        ``minute, hour, day, weekday, month, dayofyear, weekofyear, quarter, is_weekend``)."""
        names = series_ops.dt_feature_names(features)
        clash = [name for name in names if name in self._cols.all_cols]
        if clash:
            raise ValueError(f"gen_dt_feature: columns {clash} exist already")
        out_cols = self._cols.with_features(names)
        dt_col = self._cols.dt_col
        step = lambda frame: series_ops.dt_features(frame, dt_col, names)  # noqa: E731
        return self._per_series(step, out_cols)

    def gen_lag_feature(self, lags: int | Sequence[int]) -> TSDataset:
        """Add each target `lag` steps back (``lags=3`` means 1, 2, 3); the first
        ``max(lags)`` rows of each series, which lack them, are dropped."""
        lag_list = list(range(1, lags + 1)) if isinstance(lags, int) else list(lags)
        if not lag_list or any(not isinstance(lag, int) or lag < 1 for lag in lag_list):
            raise ValueError(f"gen_lag_feature(lags={lags!r}) needs positive integers")
        cols = self._cols
        out_cols = cols.with_features(series_ops.lag_names(cols.target_col, lag_list))
        return self._per_series(lambda f: series_ops.lag_features(f, cols, lag_list), out_cols)

    def gen_rolling_feature(self, window: int, stats: Sequence[str] = ("mean", "std")) -> TSDataset:
        """Add statistics of each target over the last `window` steps; the first
        ``window - 1`` rows of each series are dropped."""
        stats = [stats] if isinstance(stats, str) else list(stats)
        unknown = [stat for stat in stats if stat not in series_ops.ROLLING_STATS]
        if unknown or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"gen_rolling_feature(window={window!r}, stats={stats!r}): window is a positive "
                f"int and stats come from {series_ops.ROLLING_STATS}"
            )
        cols = self._cols
        out_cols = cols.with_features(series_ops.rolling_names(cols.target_col, window, stats))
        return self._per_series(
            lambda f: series_ops.rolling_features(f, cols, window, stats), out_cols
        )

    # --- scaling --------------------------------------------------------------------------

    def scale(
        self, scaler: str | TSScaler = "standard", fit: bool = True, per_id: bool | None = None
    ) -> TSDataset:
        """Scale targets and extra features: ``(value - center) / scale``.

        ``scale("standard")`` or ``scale("minmax")`` fits the statistics on this dataset (the
        training split); ``val.scale(train.scaler, fit=False)`` reuses them. `per_id`
        (default: when there is an id column) keeps one center and scale per series and
        target; ``False``: one per column over all series. On Spark, per-id statistics are
        computed per series in ``applyInPandas`` and global ones by one aggregation; only the
        statistics come back to the driver.
        """
        if self.scaler is not None:
            raise ValueError("the dataset is scaled already: call unscale() before scaling again")
        if isinstance(scaler, TSScaler):
            if fit:
                raise ValueError("scale(a fitted TSScaler, fit=True): pass fit=False to reuse it")
            fitted = scaler
        elif scaler in SCALER_KINDS:
            if not fit:
                raise ValueError(
                    f"scale({scaler!r}, fit=False) has no statistics: pass the training "
                    "dataset's fitted scaler, e.g. val.scale(train.scaler, fit=False)"
                )
            per_id = self._cols.id_col is not None if per_id is None else per_id
            if per_id and self._cols.id_col is None:
                raise ValueError("scale(per_id=True) needs an id_col")
            fitted = self._fit_scaler(scaler, per_id)
        else:
            raise ValueError(f"scale(scaler={scaler!r}): use one of {SCALER_KINDS} or a TSScaler")
        missing = [name for name in fitted.columns if name not in self._cols.value_cols]
        if missing:
            raise ValueError(f"the scaler scales columns {missing} that this dataset lacks")
        id_col = self._cols.id_col
        self._map_rows(lambda frame: fitted.transform(frame, id_col))
        self.scaler = fitted
        return self

    def unscale(self) -> TSDataset:
        """Undo `scale` on the data (the windows of a later `roll` are unscaled too)."""
        if self.scaler is None:
            raise ValueError("unscale(): the dataset is not scaled")
        fitted, id_col = self.scaler, self._cols.id_col
        self._map_rows(lambda frame: fitted.inverse(frame, id_col))
        self.scaler = None
        return self

    def _fit_scaler(self, kind: str, per_id: bool) -> TSScaler:
        if self.is_spark:
            from deepspark.timeseries import tsdataset_spark

            return tsdataset_spark.fit_scaler(self._spark_rows(), self._cols, kind, per_id)
        return tsdataset_pandas.fit_scaler(self._data, self._cols, kind, per_id)

    def naive_errors(self, season: int = 1) -> pd.DataFrame:
        """Per series (the index, with an id column) and target, the in-sample MAE of the
        seasonal-naive forecast ``y[t - season]``, in unscaled units: MASE's denominators.
        Spark data is summarised per series in ``applyInPandas``; one row per series returns."""
        cols = self._cols
        if self.is_spark:
            from deepspark.timeseries import tsdataset_spark

            table = tsdataset_spark.naive_errors(self._spark_rows(), cols, season)
        else:
            table = tsdataset_pandas.naive_errors(self._data, cols, season)
        if cols.id_col:
            table = table.set_index(cols.id_col)
        if self.scaler is not None:  # scaling is affine: differences scale with `scale`
            ids = table.index.to_numpy() if cols.id_col else np.zeros(len(table))
            _, spread = self.scaler.factors(ids, cols.target_col)
            table[list(cols.target_col)] = table[list(cols.target_col)].to_numpy() * spread
        return table

    def target_min(self) -> dict[str, float]:
        """The least value of each target over every series, in unscaled units (nan for a
        target with no values). Spark data is reduced per series by Spark; one row per series
        returns."""
        cols = self._cols
        targets = list(cols.target_col)
        if self.is_spark:
            from deepspark.timeseries import tsdataset_spark

            table = tsdataset_spark.target_minima(self._spark_rows(), cols)
        elif cols.id_col:
            table = self._data.groupby(cols.id_col, sort=True)[targets].min().reset_index()
        else:
            table = self._data[targets].min().to_frame().T
        least = table[targets].to_numpy("float64")
        if self.scaler is not None:  # scale > 0, so the least scaled value is the least value
            ids = table[cols.id_col].to_numpy() if cols.id_col else np.zeros(len(table))
            center, spread = self.scaler.factors(ids, targets)
            least = least * spread + center
        return {name: float(pd.Series(least[:, i]).min()) for i, name in enumerate(targets)}

    def _map_rows(self, step: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
        if self.is_spark:
            self._pending.append(step)  # row-wise steps also run per series
        else:
            self._data = step(self._data)
        self._rolled = self._window = None

    def _rows(self) -> Any:
        return self._spark_rows() if self.is_spark else self._data

    def _spark_rows(self) -> Any:
        """The Spark rows with every pending step applied (one grouped pass)."""
        if self._pending:
            from deepspark.timeseries import tsdataset_spark

            self._data = tsdataset_spark.per_series(
                self._data, self._source_cols, series_ops.chained(self._pending), self._cols
            )
            self._pending, self._source_cols = [], self._cols
        return self._data

    # --- windows --------------------------------------------------------------------------

    def window_spec(self, lookback: int, horizon: int) -> WindowSpec:
        """The windows `roll` would cut, checked: positive `lookback`, `horizon` >= 0."""
        for name, value, least in (("lookback", lookback, 1), ("horizon", horizon, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        return WindowSpec(self._cols, int(lookback), int(horizon))

    def windows(self, lookback: int, horizon: int) -> Any:
        """Every window of every series, without keeping it: a pandas or Spark DataFrame with
        id, dt (the window's last input step), x and y (flat float32 arrays)."""
        spec = self.window_spec(lookback, horizon)
        if self.is_spark:
            from deepspark.timeseries import tsdataset_spark

            return tsdataset_spark.roll(self._spark_rows(), spec)
        return tsdataset_pandas.windows_of(
            self._data, self._cols, lambda frame: windows.roll_series(frame, spec)
        )

    def last_windows(self, lookback: int) -> Any:
        """The last `lookback` steps of every series: the inputs of a forecast of the future."""
        spec = self.window_spec(lookback, 0)
        if self.is_spark:
            from deepspark.timeseries import tsdataset_spark

            return tsdataset_spark.last_windows(self._spark_rows(), spec)
        # float64: networks cast as they run; seasonal naive forecasts the values themselves
        return tsdataset_pandas.windows_of(
            self._data, self._cols, lambda frame: windows.last_window(frame, spec, "float64")
        )

    def roll(
        self,
        lookback: int,
        horizon: int,
        feature_col: Sequence[str] | None = None,
        target_col: Sequence[str] | None = None,
    ) -> TSDataset:
        """Cut every series into windows of `lookback` input steps and `horizon` target steps,
        kept for `to_numpy`, `to_pandas` and `to_spark`. `feature_col` and `target_col` choose
        a subset of the dataset's (default: all). A series shorter than ``lookback + horizon``
        raises, naming it (checked on the driver by one aggregation for Spark data)."""
        cols = self._cols
        if feature_col is not None or target_col is not None:
            targets = series_ops.column_names(target_col, "target_col") or cols.target_col
            features = (
                cols.feature_col
                if feature_col is None
                else series_ops.column_names(feature_col, "feature_col")
            )
            unknown = [n for n in (*targets, *features) if n not in cols.value_cols]
            if unknown:
                raise ValueError(f"roll: columns {unknown} are not targets or features here")
            cols = SeriesColumns(cols.dt_col, targets, cols.id_col, features)
        saved, self._cols = self._cols, cols
        try:
            rolled = self.windows(lookback, horizon)
        finally:
            self._cols = saved
        self._rolled, self._window = rolled, WindowSpec(cols, int(lookback), int(horizon))
        return self

    def _rolled_or_raise(self) -> tuple[Any, WindowSpec]:
        if self._rolled is None or self._window is None:
            raise ValueError("call roll(lookback, horizon) first")
        return self._rolled, self._window

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The rolled windows as ``x`` (windows, lookback, features) and ``y`` (windows,
        horizon, targets), float32, ordered by id then time; ``y`` is None for horizon 0.
        For Spark data this collects the windows to the driver: for inspection and small data;
        a Forecaster trains on `to_spark` instead."""
        _rolled, spec = self._rolled_or_raise()
        frame = self.to_pandas()
        x = windows.stacked(frame[windows.X_COL], spec.lookback, spec.input_size)
        if not spec.horizon:
            return x, None
        return x, windows.stacked(frame[windows.Y_COL], spec.horizon, spec.output_size)

    def to_pandas(self) -> pd.DataFrame:
        """The rolled windows (after `roll`) or else the rows, as pandas, ordered by id and
        time (collects Spark data)."""
        data = self._rolled if self._rolled is not None else self._rows()
        frame = data.toPandas() if self.is_spark else data.copy()
        return tsdataset_pandas.sorted_rows(frame, self._cols)

    def to_spark(self, spark: Any = None) -> Any:
        """The rolled windows (after `roll`) or else the rows, as a Spark DataFrame; pandas
        data goes to `spark` (default: the running session)."""
        data = self._rolled if self._rolled is not None else self._rows()
        if self.is_spark:
            return data
        from deepspark.context.session import current_session

        spark = spark or current_session()
        if spark is None:
            raise RuntimeError("to_spark needs a running session: call deepspark.init_context()")
        return spark.createDataFrame(data)

    def get_last_window(self, lookback: int) -> tuple[np.ndarray, Any]:
        """(x, ids): the last `lookback` steps of each series as (series, lookback, features)."""
        frame = self.last_windows(lookback)
        if self.is_spark:
            frame = frame.toPandas()
        spec = self.window_spec(lookback, 0)
        ids = frame[self._cols.id_col].to_numpy() if self._cols.id_col else None
        return windows.stacked(frame[windows.X_COL], lookback, spec.input_size), ids

    @property
    def rolled_shapes(self) -> dict[str, tuple[int, int]]:
        """Per row of the rolled frame: the shapes of the flat ``x`` and ``y`` arrays."""
        _, spec = self._rolled_or_raise()
        return {"x": (spec.lookback, spec.input_size), "y": (spec.horizon, spec.output_size)}

    def __repr__(self) -> str:
        kind = "Spark" if self.is_spark else "pandas"
        return (
            f"TSDataset({kind}, dt_col={self.dt_col!r}, target_col={self.target_col}, "
            f"id_col={self.id_col!r}, feature_col={self.feature_col}, "
            f"scaled={self.scaler is not None})"
        )
