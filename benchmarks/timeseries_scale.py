"""Many independent series: one global deepspark model against statsforecast's own
multi-series path.

Each series is generated on its own (its own random generator): a seasonal ARMA process with
its own AR and MA coefficients, a yearly pattern of its own (random harmonics, amplitude and
phase), its own trend, noise level and, for half of them, a level shift. No series is cut from
another, so no held-out continuation appears in another series' history. Both sides forecast
each series' last 12 points, hidden from them: one global N-HiTS trained on Spark (2 workers),
and statsforecast's multi-series path, one ``StatsForecast(models=[AutoETS(season_length=12)],
freq="MS", n_jobs=...)`` call over the long-format frame (its documented way to forecast many
series). Wall time end to end and MASE (against each series' in-sample seasonal-naive error).
Target: the global model faster at equal or better MASE.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
from _common import print_table

HORIZON, SEASON, LOOKBACK = 12, 12, 36
GLOBAL_MODEL = "global N-HiTS (2 workers)"
STATSFORECAST = "statsforecast AutoETS (multi-series, n_jobs=2)"
FUGUE = "statsforecast AutoETS on Spark (Fugue)"


def independent_series(count: int, seed: int = 0) -> pd.DataFrame:
    """`count` monthly series of 150-400 points, each drawn from its own generator: a
    stationary seasonal ARMA, (1 - a B)(1 - s B^12) x = (1 + m B) e, plus a yearly pattern of
    three harmonics, a trend and, for half of them, a level shift."""
    from scipy.signal import lfilter

    parts = []
    for number in range(count):
        rng = np.random.default_rng([seed, number])
        length = int(rng.integers(150, 401))
        ar, seasonal_ar, ma = rng.uniform(-0.8, 0.9), rng.uniform(0.0, 0.7), rng.uniform(-0.5, 0.5)
        denominator = np.zeros(SEASON + 2)
        denominator[[0, 1, SEASON, SEASON + 1]] = [1.0, -ar, -seasonal_ar, ar * seasonal_ar]
        burn_in = 10 * SEASON  # the process forgets its zero start
        arma = lfilter([1.0, ma], denominator, rng.normal(0.0, 1.0, length + burn_in))[burn_in:]
        steps = np.arange(length)
        phases = rng.uniform(0.0, 2 * np.pi, 3)
        pattern = sum(
            rng.normal(0.0, 1.0 / k) * np.sin(2 * np.pi * k * steps / SEASON + phases[k - 1])
            for k in (1, 2, 3)
        )
        y = pattern * rng.uniform(0.5, 4.0) + arma * rng.uniform(0.2, 1.0)
        y = y + rng.normal(0.0, 0.02) * steps
        if rng.random() < 0.5:
            y[int(rng.integers(length // 4, length - 24)) :] += rng.normal(0.0, 3.0)
        parts.append(
            pd.DataFrame(
                {
                    "unique_id": number,
                    "ds": pd.date_range("1990-01", periods=length, freq="MS"),
                    "y": y + rng.uniform(20.0, 200.0),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def scale_section(spark, count: int) -> dict:
    from pyspark.sql import functions as F

    from deepspark.timeseries import Forecaster, TSDataset

    series = independent_series(count)
    print(f"\nScale: {count:,} independent series, {len(series):,} points", flush=True)
    position = series.groupby("unique_id").cumcount(ascending=False)
    history_pd, holdout_pd = series[position >= HORIZON], series[position < HORIZON]
    history = spark.createDataFrame(history_pd).repartition(2, "unique_id").cache()
    history.count()
    holdout = holdout_pd.rename(columns={"y": "actual"})
    naive_error = (
        history_pd.assign(lagged=history_pd.groupby("unique_id")["y"].shift(SEASON))
        .assign(error=lambda f: (f["y"] - f["lagged"]).abs())
        .groupby("unique_id")["error"]
        .mean()
        .rename("naive_mae")
    )

    def score(forecasts: pd.DataFrame, column: str) -> float:
        joined = holdout.merge(forecasts, on=["unique_id", "ds"]).join(naive_error, on="unique_id")
        if len(joined) != len(holdout):
            raise RuntimeError(f"{len(joined)} forecasts for {len(holdout)} held-out points")
        per_series = (joined[column] - joined["actual"]).abs().groupby(joined["unique_id"]).mean()
        return float((per_series / naive_error).mean())

    def run_statsforecast() -> pd.DataFrame:
        from statsforecast import StatsForecast
        from statsforecast.models import AutoETS

        # Spark DataFrame in, as the global model gets it; the multi-series call runs on the
        # driver's cores (n_jobs=2: this machine's 2 cores).
        frame = history.toPandas()
        model = StatsForecast(models=[AutoETS(season_length=SEASON)], freq="MS", n_jobs=2)
        return model.forecast(df=frame, h=HORIZON)[["unique_id", "ds", "AutoETS"]]

    def run_fugue() -> pd.DataFrame:
        from statsforecast import StatsForecast
        from statsforecast.models import AutoETS

        # statsforecast's Spark back end: a Spark DataFrame in runs through Fugue on Spark.
        model = StatsForecast(models=[AutoETS(season_length=SEASON)], freq="MS")
        return model.forecast(df=history, h=HORIZON).toPandas()[["unique_id", "ds", "AutoETS"]]

    def run_global() -> pd.DataFrame:
        data = TSDataset.from_spark(history, dt_col="ds", target_col="y", id_col="unique_id")
        forecaster = Forecaster("nhits", lookback=LOOKBACK, horizon=HORIZON, lr=3e-3, loss="mae")
        forecaster.fit(data, epochs=2, batch_size=1024, num_workers=2, progress=False)
        forecasts = forecaster.predict(data)
        return forecasts.select("unique_id", "ds", F.col("y").alias("global")).toPandas()

    results = {}
    for name, run, column in (
        (STATSFORECAST, run_statsforecast, "AutoETS"),
        (FUGUE, run_fugue, "AutoETS"),
        (GLOBAL_MODEL, run_global, "global"),
    ):
        start = time.perf_counter()
        try:
            forecasts = run()
        except Exception as error:  # the Fugue back end is optional: say why it did not run
            if name != FUGUE:
                raise
            results[name] = {"failed": f"{type(error).__name__}: {error}"[:300]}
            print(f"  {name}: failed: {results[name]['failed']}", flush=True)
            continue
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "mase": score(forecasts, column)}
        print(f"  {name}: {seconds:,.1f} s, MASE {results[name]['mase']:.3f}", flush=True)
    history.unpersist()
    print_table(
        ["method", "seconds", "MASE"],
        [[n, r["seconds"], r["mase"]] for n, r in results.items() if "seconds" in r],
    )
    return {"series": count, "points": len(series), **results}


def scale_json(scale: dict) -> dict:
    baseline, global_model = scale[STATSFORECAST], scale[GLOBAL_MODEL]
    speedup = baseline["seconds"] / global_model["seconds"]
    return {
        "scale_series": scale["series"],
        "scale_points": scale["points"],
        "scale_generator": "independent seasonal ARMA series (timeseries_scale.py)",
        "scale_statsforecast_seconds": round(baseline["seconds"], 1),
        "scale_global_seconds": round(global_model["seconds"], 1),
        "scale_speedup": round(speedup, 2),
        "scale_statsforecast_mase": round(baseline["mase"], 4),
        "scale_global_mase": round(global_model["mase"], 4),
        "scale_fugue": {
            k: round(v, 4) if isinstance(v, float) else v for k, v in scale[FUGUE].items()
        },
        "scale_target_met": speedup > 1 and global_model["mase"] <= baseline["mase"],
        "cores": len(os.sched_getaffinity(0)),
    }
