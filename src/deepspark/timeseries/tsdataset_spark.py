"""The Spark side of TSDataset: every per-series step runs grouped by id, on the executors.

Per-series steps call the functions of `series_ops` and `windows` inside
``groupBy(id).applyInPandas``; row-wise steps (scaling, calendar features) inside
``mapInPandas``; the split uses window functions. What reaches the driver is small and says
so: scaling statistics (one row per series), the shortest series' length, the frequency, the
summed errors of an evaluation. Rows of data are never collected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from deepspark.timeseries import forecast_metrics, scaler, series_ops, windows
from deepspark.timeseries.series_ops import SeriesColumns
from deepspark.timeseries.windows import WindowSpec

_POSITION, _LENGTH = "__position__", "__length__"
_NUMERIC = (
    T.ByteType,
    T.ShortType,
    T.IntegerType,
    T.LongType,
    T.FloatType,
    T.DoubleType,
    T.DecimalType,
)


def prepare(sdf: DataFrame, cols: SeriesColumns) -> DataFrame:
    """Check column roles and types on the driver (no job); keep the role columns, values as
    double and the time column as timestamp."""
    fields = {field.name: field.dataType for field in sdf.schema.fields}
    for role, names in (
        ("dt_col", [cols.dt_col]),
        ("target_col", cols.target_col),
        ("id_col", [cols.id_col] if cols.id_col else []),
        ("extra_feature_col", cols.feature_col),
    ):
        missing = [name for name in names if name not in fields]
        if missing:
            raise ValueError(
                f"{role}={missing[0]!r} is not a column of the DataFrame; it has {sorted(fields)}"
            )
    dt_type = fields[cols.dt_col]
    if not isinstance(dt_type, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        raise ValueError(
            f"dt_col={cols.dt_col!r} has type {dt_type.simpleString()}, not a timestamp or date: "
            f"convert it first, e.g. F.to_timestamp({cols.dt_col!r})"
        )
    for role, names in (("target_col", cols.target_col), ("extra_feature_col", cols.feature_col)):
        for name in names:
            if not isinstance(fields[name], _NUMERIC):
                raise ValueError(
                    f"{role} column {name!r} has type {fields[name].simpleString()}; targets and "
                    "extra features must be numeric: cast or encode it first"
                )
    selected = [F.col(cols.id_col)] if cols.id_col else []
    selected.append(F.col(cols.dt_col).cast("timestamp").alias(cols.dt_col))
    selected += [F.col(name).cast("double").alias(name) for name in cols.value_cols]
    return sdf.select(*selected)


def schema(sdf: DataFrame, cols: SeriesColumns) -> T.StructType:
    """The schema of a prepared frame with `cols`' columns (values double)."""
    fields = []
    if cols.id_col:
        fields.append(T.StructField(cols.id_col, sdf.schema[cols.id_col].dataType))
    fields.append(T.StructField(cols.dt_col, T.TimestampType()))
    fields += [T.StructField(name, T.DoubleType()) for name in cols.value_cols]
    return T.StructType(fields)


def _grouped(sdf: DataFrame, cols: SeriesColumns):
    return sdf.groupBy(cols.id_col) if cols.id_col else sdf.groupBy(F.lit("series"))


def per_series(
    sdf: DataFrame,
    cols: SeriesColumns,
    step: Callable[[pd.DataFrame], pd.DataFrame],
    out_cols: SeriesColumns,
) -> DataFrame:
    """`step` on each series (all its rows in one pandas frame), grouped by id."""
    names = out_cols.all_cols

    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        return step(frame)[names]

    return _grouped(sdf, cols).applyInPandas(apply, schema(sdf, out_cols))


def per_series_table(
    sdf: DataFrame,
    cols: SeriesColumns,
    step: Callable[[pd.DataFrame], pd.DataFrame],
    out_schema: T.StructType,
) -> DataFrame:
    """`step` on each series (all its rows in one pandas frame), any output schema."""
    names = out_schema.fieldNames()

    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        return step(frame)[names]

    return _grouped(sdf, cols).applyInPandas(apply, out_schema)


def per_rows(
    sdf: DataFrame, step: Callable[[pd.DataFrame], pd.DataFrame], out_schema: T.StructType
) -> DataFrame:
    """`step` on batches of rows (no grouping, no shuffle)."""
    names = out_schema.fieldNames()

    def apply(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in batches:
            yield step(frame)[names]

    return sdf.mapInPandas(apply, out_schema)


def split(
    sdf: DataFrame, cols: SeriesColumns, val_ratio: float, test_ratio: float
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Train, validation and test parts of every series, in time order (window functions;
    each series keeps floor(n * ratio) rows for validation and test, as the pandas side)."""
    keys = [cols.id_col] if cols.id_col else []
    ordered = Window.partitionBy(*keys).orderBy(cols.dt_col)
    whole = Window.partitionBy(*keys)
    tagged = sdf.withColumn(_POSITION, F.row_number().over(ordered) - 1).withColumn(
        _LENGTH, F.count(F.lit(1)).over(whole)
    )
    test_rows = F.floor(F.col(_LENGTH) * F.lit(float(test_ratio)))
    val_rows = F.floor(F.col(_LENGTH) * F.lit(float(val_ratio)))
    train_end = F.col(_LENGTH) - val_rows - test_rows
    position = F.col(_POSITION)
    parts = (
        position < train_end,
        (position >= train_end) & (position < train_end + val_rows),
        position >= train_end + val_rows,
    )
    return tuple(tagged.filter(part).drop(_POSITION, _LENGTH) for part in parts)


def fit_scaler(sdf: DataFrame, cols: SeriesColumns, kind: str, per_id: bool) -> scaler.TSScaler:
    """Per id: `scaler.series_stats` in ``applyInPandas`` (the pandas TSDataset's own
    numbers). Global: one Spark aggregation (mean and population std, or min and max)."""
    columns = cols.value_cols
    if per_id:
        out = T.StructType(
            [sdf.schema[cols.id_col], T.StructField(scaler.STAT_COL, T.StringType())]
            + [T.StructField(name, T.DoubleType()) for name in columns]
        )

        def stats(frame: pd.DataFrame) -> pd.DataFrame:
            result = scaler.series_stats(frame, columns, kind)
            result.insert(0, cols.id_col, frame[cols.id_col].iloc[0])
            return result

        table = sdf.groupBy(cols.id_col).applyInPandas(stats, out).toPandas()
        return scaler.scaler_from_stats(kind, True, columns, table, cols.id_col)
    if kind == "standard":
        first = [F.mean(name).alias(f"c{i}") for i, name in enumerate(columns)]
        second = [F.stddev_pop(name).alias(f"s{i}") for i, name in enumerate(columns)]
    else:
        first = [F.min(name).alias(f"c{i}") for i, name in enumerate(columns)]
        second = [(F.max(name) - F.min(name)).alias(f"s{i}") for i, name in enumerate(columns)]
    row = sdf.agg(*first, *second).first()
    center = [row[f"c{i}"] for i in range(len(columns))]
    spread = [row[f"s{i}"] if row[f"s{i}"] else 1.0 for i in range(len(columns))]
    table = pd.DataFrame([center, spread], columns=columns)
    table.insert(0, scaler.STAT_COL, ["center", "scale"])
    return scaler.scaler_from_stats(kind, False, columns, table, None)


def check_rollable(sdf: DataFrame, cols: SeriesColumns, needed: int) -> None:
    """On the driver, before rolling: the shortest series and a series with repeated
    timestamps, found by one aggregation (one row of counts and ids comes back)."""
    keys = [cols.id_col] if cols.id_col else []
    per_id = sdf.groupBy(*keys).agg(
        F.count(F.lit(1)).alias("rows"), F.countDistinct(cols.dt_col).alias("stamps")
    )
    key = F.col(cols.id_col) if cols.id_col else F.lit(None)
    summary = per_id.agg(
        F.count(F.lit(1)).alias("series"),
        F.min("rows").alias("shortest_rows"),
        F.min_by(key, "rows").alias("shortest"),
        F.max(F.col("rows") - F.col("stamps")).alias("repeats"),
        F.max_by(key, F.col("rows") - F.col("stamps")).alias("repeated"),
    ).first()
    if summary is None or not summary["series"]:
        raise ValueError("the TSDataset has no rows")

    def name(series_id) -> str:
        return f"series {series_id!r}" if cols.id_col else "the series"

    if summary["shortest_rows"] < needed:
        raise ValueError(
            f"{name(summary['shortest'])} has {summary['shortest_rows']} rows, fewer than "
            f"lookback + horizon = {needed}: lower lookback or horizon, or drop the short series"
        )
    if summary["repeats"] > 0:
        raise ValueError(
            f"{name(summary['repeated'])} has several rows at one timestamp: call deduplicate() "
            "or resample() before roll"
        )


def rolled_schema(sdf: DataFrame, spec: WindowSpec) -> T.StructType:
    fields = [sdf.schema[spec.cols.id_col]] if spec.cols.id_col else []
    fields.append(T.StructField(spec.cols.dt_col, T.TimestampType()))
    fields.append(T.StructField(windows.X_COL, T.ArrayType(T.FloatType(), False)))
    if spec.horizon:
        fields.append(T.StructField(windows.Y_COL, T.ArrayType(T.FloatType(), False)))
    return T.StructType(fields)


def roll(sdf: DataFrame, spec: WindowSpec) -> DataFrame:
    """Every window of every series: id, dt (last input step), x and y (flat float arrays)."""
    check_rollable(sdf, spec.cols, spec.lookback + spec.horizon)

    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        return windows.roll_series(frame, spec)

    return _grouped(sdf, spec.cols).applyInPandas(cut, rolled_schema(sdf, spec))


def last_windows(sdf: DataFrame, spec: WindowSpec) -> DataFrame:
    """The last `lookback` steps of every series as one window (id, dt, x)."""
    check_rollable(sdf, spec.cols, spec.lookback)
    keys = [spec.cols.id_col] if spec.cols.id_col else []
    latest = Window.partitionBy(*keys).orderBy(F.col(spec.cols.dt_col).desc())
    tail = (
        sdf.withColumn(_POSITION, F.row_number().over(latest))
        .filter(F.col(_POSITION) <= spec.lookback)
        .drop(_POSITION)
    )
    window_spec = WindowSpec(spec.cols, spec.lookback, 0)

    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        return windows.last_window(frame, window_spec)

    return _grouped(tail, spec.cols).applyInPandas(cut, rolled_schema(sdf, window_spec))


def infer_freq(sdf: DataFrame, cols: SeriesColumns) -> str | None:
    """The most common interval over the series (each series' own in a task; the distinct
    answers and their counts come back)."""
    out = T.StructType([T.StructField("freq", T.StringType())])

    def freq(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"freq": [series_ops.infer_freq(frame[cols.dt_col])]})

    counts = _grouped(sdf, cols).applyInPandas(freq, out).groupBy("freq").count()
    rows = counts.filter(F.col("freq").isNotNull()).orderBy(F.desc("count")).limit(1).collect()
    return rows[0]["freq"] if rows else None


def naive_errors(sdf: DataFrame, cols: SeriesColumns, season: int) -> pd.DataFrame:
    """Per series and target, the in-sample seasonal-naive MAE (one row per series)."""
    key = cols.id_col
    fields = [sdf.schema[key]] if key else []
    out = T.StructType(fields + [T.StructField(name, T.DoubleType()) for name in cols.target_col])

    def errors(frame: pd.DataFrame) -> pd.DataFrame:
        row = pd.DataFrame([series_ops.naive_errors(frame, cols, season)])
        if key:
            row.insert(0, key, frame[key].iloc[0])
        return row

    return _grouped(sdf, cols).applyInPandas(errors, out).toPandas()


def target_minima(sdf: DataFrame, cols: SeriesColumns) -> pd.DataFrame:
    """Per series, the least value of each target (one row per series, with its id)."""
    least = [F.min(F.col(name)).cast("double").alias(name) for name in cols.target_col]
    if cols.id_col:
        return sdf.groupBy(cols.id_col).agg(*least).toPandas()
    return sdf.agg(*least).toPandas()


def summed_errors(
    scored: DataFrame,
    sums_of: Callable[[pd.DataFrame], dict[str, float]],
    names: Sequence[str] = forecast_metrics.SUMS,
) -> dict[str, float]:
    """`sums_of` on each batch of scored windows (a dict with keys `names`), added up by
    Spark: one row comes back."""
    out = T.StructType([T.StructField(name, T.DoubleType()) for name in names])

    def apply(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in batches:
            yield forecast_metrics.sums_frame(sums_of(frame))

    row = scored.mapInPandas(apply, out).agg(*[F.sum(name).alias(name) for name in names]).first()
    return {name: float(row[name] or 0.0) for name in names}
