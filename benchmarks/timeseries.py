"""Time series (issues 15 and 27): AutoTS and deepspark's forecasters against statsforecast,
its anomaly detectors against simple rules, and a global model against statsforecast's
multi-series path, each in one run on the same data.

1. Accuracy (``--split test``, the headline; ``--split dev`` while tuning). The series and the
   split live in `timeseries_sets.py`: 50 development sets (the five that shaped AutoTS's defaults
   and the first three held-out sets, each read before a change) and 13 held-out test sets (the
   fourth held-out set), fixed before any run, from other domains. Holdouts: each series' last
   `ORIGINS` (3) horizons, each forecast from the history before it (`origins_of`; short series keep
   fewer); a series' score is the mean over its origins. MASE (against the in-sample seasonal-naive
   error of the history; one step back without a season) and sMAPE.
   Baselines as statsforecast's documentation sets them up: `SeasonalNaive`, `AutoETS`,
   `AutoARIMA`, `AutoTheta` with ``season_length`` the series' season. For seasons over 24,
   which statsforecast's ETS does not fit, the AutoETS column is `MSTL` (the season taken
   out) with a non-seasonal AutoETS on the rest, and an `MSTL` column with an AutoARIMA
   trend (statsforecast's example for long seasons) is added. AutoTS runs with frozen
   defaults (the `autots_model` rule below, decided on the development sets) and
   ``seed=0``; it never sees a holdout. "AutoTS networks" is the same search without
   statistical candidates. Targets (on the test split): AutoTS's MASE no worse than
   SeasonalNaive's on at least 80% of the series, and better than the best statsforecast
   model's on at least half. ``--unseeded N`` adds N runs of AutoTS without a seed and
   reports their spread. Every forecast goes into the log line.
2. Anomalies (`timeseries_anomaly.py`): ranking metrics on a development set (Yahoo) and a
   held-out one (MIT-BIH ECG).
3. Scale (`timeseries_scale.py`): independent series, a global model against statsforecast.

Usage: python benchmarks/timeseries.py [--quick] [--split test|dev] [--series nile,lynx]
[--scale N] [--sections accuracy,anomaly,scale] [--columns SeasonalNaive,AutoETS,AutoTS]
[--origins 3] [--unseeded N];
the last line is one JSON object, also appended to benchmarks/log.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from _common import emit_json, machine, print_table, run_logged, today
from timeseries_sets import ForecastSet, development_sets, test_sets
from timeseries_targets import STATSFORECAST, autots_targets, variant_shares

Forecast = Callable[[pd.DataFrame, int, int], np.ndarray]
ETS_SEASON_LIMIT = 24  # statsforecast's ETS fits at most 24 seasonal states
QUICK = False
ORIGINS = 3  # holdouts per series: its last three horizons (issue 27's second held-out set)


# --- metrics (the library's own) ------------------------------------------------------------


def smape(y, yhat) -> float:
    from deepspark.timeseries import smape as library_smape

    return float(library_smape(np.asarray(y, float), np.asarray(yhat, float)))


def mase(y, yhat, history, season) -> float:
    from deepspark.timeseries import mase as library_mase

    return float(
        library_mase(
            np.asarray(y, float), np.asarray(yhat, float), np.asarray(history, float), season
        )
    )


# --- models ---------------------------------------------------------------------------------


def statsforecast_model(name: str) -> Forecast:
    """A statsforecast model on one series, set up as its documentation does."""

    def forecast(history: pd.DataFrame, horizon: int, season: int) -> np.ndarray | None:
        from statsforecast import StatsForecast
        from statsforecast import models as sf

        if name == "MSTL":
            if season <= ETS_SEASON_LIMIT:
                return None  # AutoETS fits these seasons itself
            # statsforecast's documented set-up for long seasons: MSTL with an AutoARIMA trend
            model = sf.MSTL(season_length=season, trend_forecaster=sf.AutoARIMA(), alias=name)
        elif name == "AutoETS" and season > ETS_SEASON_LIMIT:
            # ETS cannot hold the season: MSTL takes it out, a non-seasonal AutoETS the rest
            trend = sf.AutoETS(model="ZZN")
            model = sf.MSTL(season_length=season, trend_forecaster=trend, alias=name)
        else:
            model = getattr(sf, name)(season_length=season)
        frame = history.assign(unique_id="s")[["unique_id", "ds", "y"]]
        freq = pd.infer_freq(history["ds"])
        result = StatsForecast(models=[model], freq=freq).forecast(df=frame, h=horizon)
        return result[name].to_numpy()

    return forecast


def deepspark_model(kind: str) -> Forecast:
    """One deepspark forecaster of `kind`, trained through the engine."""

    def forecast(history: pd.DataFrame, horizon: int, season: int) -> np.ndarray:
        from deepspark.timeseries import Forecaster, TSDataset

        period = max(season, horizon)
        lookback = int(min(3 * period, max(period, (len(history) - horizon) // 3)))
        data = TSDataset.from_pandas(history, dt_col="ds", target_col="y")
        windows = len(history) - lookback - horizon + 1
        epochs = int(np.clip(600 * 32 // windows, 10, 100)) if not QUICK else 10
        forecaster = Forecaster(kind, lookback=lookback, horizon=horizon, lr=3e-3, loss="mae")
        forecaster.fit(data, epochs=epochs, batch_size=32, num_workers=1, progress=False)
        return forecaster.predict(data)["y"].to_numpy()

    return forecast


def autots_lookbacks(train_rows: int, horizon: int, season: int) -> list[int]:
    """The frozen lookback rule: 1-3 periods (the season, or the horizon when longer) that
    leave at least 16 training windows; the shortest alone when none does."""
    period = max(season, horizon)
    candidates = [k * period for k in (1, 2, 3)]
    kept = [n for n in candidates if train_rows - n - horizon >= 15]
    return kept or candidates[:1]


def autots_model(
    n_trials: int,
    seed: int | None = 0,
    record: list | None = None,
    statistical: tuple[str, ...] | None = None,
) -> Forecast:
    """AutoTS with the defaults frozen after the development runs. Its validation split is
    the history's last steps; the holdout is never passed in."""

    def forecast(history: pd.DataFrame, horizon: int, season: int) -> np.ndarray:
        from deepspark.timeseries import AutoTS, TSDataset

        # Several horizons of rolling origins judge a trial better than one; every series
        # keeps three quarters of its history for training.
        validation_steps = max(horizon, min(4 * horizon, len(history) // 4))
        train_rows = len(history) - validation_steps
        lookbacks = autots_lookbacks(train_rows, horizon, season)
        windows = train_rows - lookbacks[0] - horizon + 1
        epochs = int(np.clip(600 * 32 // windows, 10, 100)) if not QUICK else 10

        def dataset(frame: pd.DataFrame) -> TSDataset:
            return TSDataset.from_pandas(frame, dt_col="ds", target_col="y")

        train = dataset(history.iloc[:train_rows]).scale("standard")
        validation = dataset(history.iloc[train_rows:]).scale(train.scaler, fit=False)
        search = AutoTS(
            horizon=horizon,
            season=season if season > 1 else None,
            models=("dlinear", "nbeats", "nhits", "lstm"),
            lookback=lookbacks,
            lr=(1e-3, 1e-2),
            loss="mae",
            checkpoint_dir=tempfile.mkdtemp(prefix="bench-autots-"),
            seed=seed,
            **({} if statistical is None else {"statistical": statistical}),
        )
        pipeline = search.fit(train, validation, n_trials=n_trials, epochs=epochs, batch_size=32)
        members = [(t["config"]["model"], t["config"]["lookback"]) for t in search.members_]
        check = {
            k: round(v, 5) if isinstance(v, float) else v
            for k, v in (search.validation_ or {}).items()
        }
        if record is not None:
            record.append({**pipeline.config, "members": members, "naive_check": check})
        return pipeline.predict(dataset(history))["y"].to_numpy()

    return forecast


AUTOTS_CONFIGS: list[dict] = []
NETWORKS_CONFIGS: list[dict] = []
ARIMA_CONFIGS: list[dict] = []
NO_ARIMA_CONFIGS: list[dict] = []
RECORDS = {
    "AutoTS": AUTOTS_CONFIGS,
    "AutoTS networks": NETWORKS_CONFIGS,
    "AutoTS +ARIMA": ARIMA_CONFIGS,
    "AutoTS -ARIMA": NO_ARIMA_CONFIGS,
}
DEFAULT_COLUMNS = (*STATSFORECAST, "AutoTS")


def models() -> dict[str, Forecast]:
    """The accuracy table's columns; one line adds one."""
    trials = 4 if QUICK else 32
    return {
        **{name: statsforecast_model(name) for name in STATSFORECAST},
        "ds DLinear": deepspark_model("dlinear"),
        "ds N-BEATS": deepspark_model("nbeats"),
        "ds N-HiTS": deepspark_model("nhits"),
        "ds LSTM": deepspark_model("lstm"),
        "AutoTS": autots_model(trials, seed=0, record=AUTOTS_CONFIGS),
        # AutoTS without statistical candidates: its networks, or seasonal naive
        "AutoTS networks": autots_model(trials, 0, NETWORKS_CONFIGS, statistical=()),
        # AutoARIMA as a third statistical candidate: tried on the development sets (stop 36),
        # then the default; the same as "AutoTS" since
        "AutoTS +ARIMA": autots_model(
            trials, 0, ARIMA_CONFIGS, statistical=("AutoETS", "AutoTheta", "AutoARIMA")
        ),
        # the default before stop 36: AutoETS and AutoTheta only
        "AutoTS -ARIMA": autots_model(
            trials, 0, NO_ARIMA_CONFIGS, statistical=("AutoETS", "AutoTheta")
        ),
    }


def sets_for(split: str, names: list[str] | None = None) -> list[ForecastSet]:
    """The series of a split: "dev" tunes, "test" is reported once with frozen defaults."""
    if split not in ("dev", "test"):
        raise ValueError(f"split={split!r}: 'dev' or 'test'")
    return test_sets(names) if split == "test" else development_sets(names)


def history_of(series: ForecastSet) -> pd.DataFrame:
    """What a model is given at the last origin: the series without its last `horizon`
    values."""
    return series.frame.iloc[: -series.horizon]


def origins_of(series: ForecastSet, count: int) -> list[tuple[pd.DataFrame, np.ndarray]]:
    """The series' holdouts: its last `count` horizons, each forecast from the history before
    it, (history, holdout) pairs, latest first. An origin whose history is shorter than four
    horizons, or two seasons and two horizons, is left out (the last one is always kept)."""
    frame, horizon = series.frame, series.horizon
    shortest = max(4 * horizon, 2 * series.season + 2 * horizon)
    pairs = []
    for k in range(1, count + 1):
        end = len(frame) - k * horizon
        if k > 1 and end < shortest:
            break
        holdout = frame["y"].to_numpy()[end : end + horizon]
        pairs.append((frame.iloc[:end], holdout))
    return pairs


def accuracy_section(
    split: str,
    columns: list[str],
    unseeded: int,
    names: list[str] | None = None,
    scores: dict | None = None,
    origins: int = ORIGINS,
) -> dict:
    """Forecast each set of `split` with each of `columns` from each of its `origins`; a
    series' score is the mean over its origins. `scores` (filled as the run goes,
    ``{series: {model: {"mase", "smape"}}}``) keeps what a stopped run measured."""
    sets = sets_for(split, names)
    chosen = {k: v for k, v in models().items() if k in columns}
    if QUICK:
        sets = sets[:2]
    scores = {} if scores is None else scores
    seconds: dict[str, float] = dict.fromkeys(chosen, 0.0)
    per_origin: dict[str, dict[str, list[dict]]] = {}
    for series in sets:
        pairs = origins_of(series, origins)
        per_origin[series.name] = {}
        for name, forecast in chosen.items():
            runs = []
            for origin, (history, holdout) in enumerate(pairs):
                start = time.perf_counter()
                predicted = forecast(history, series.horizon, series.season)
                seconds[name] += time.perf_counter() - start
                if name in RECORDS:  # which series and origin the config was searched for
                    RECORDS[name][-1] |= {"series": series.name, "origin": origin}
                if predicted is None:
                    break
                runs.append({**score(series, history, holdout, predicted), "forecast": predicted})
            if not runs:
                continue
            per_origin[series.name][name] = runs
            scores.setdefault(series.name, {})[name] = {
                metric: float(np.mean([run[metric] for run in runs]))
                for metric in ("mase", "smape")
            }
            got = [round(run["mase"], 3) for run in runs]
            print(f"  {series.name:16s} {name:16s} MASE {np.mean(got):7.3f} {got}", flush=True)
    spread = autots_spread(sets, unseeded, origins) if unseeded else {}
    for metric in ("mase", "smape"):
        print(
            f"\n{metric} on the {split} split (mean over up to {origins} origins; lower is better)"
        )
        rows = [
            [s, *(scores[s].get(m, {}).get(metric, float("nan")) for m in chosen)] for s in scores
        ]
        print_table(["series", *chosen], rows)
    targets = autots_targets(scores, AUTOTS_CONFIGS) if "AutoTS" in chosen else {}
    targets["autots_variant_shares"] = variant_shares(scores, [m for m in chosen if "AutoTS" in m])
    return {
        "split": split,
        "origins": origins,
        "series": {s.name: f"{s.domain}, {s.frequency}" for s in sets},
        "per_series": scores,
        "per_origin": per_origin,
        "seconds": seconds,
        **targets,
        **spread,
    }


def score(
    series: ForecastSet, history: pd.DataFrame, holdout: np.ndarray, predicted: np.ndarray
) -> dict:
    return {
        "mase": mase(holdout, predicted, history["y"].to_numpy(), series.season),
        "smape": smape(holdout, predicted),
    }


def autots_spread(sets: list[ForecastSet], runs: int, origins: int) -> dict:
    """MASE of AutoTS without a seed (mean over the origins), `runs` times per series: min,
    median, max."""
    per_series = {}
    for series in sets:
        forecast = autots_model(4 if QUICK else 32, seed=None)
        values = [
            float(
                np.mean(
                    [
                        score(
                            series,
                            history,
                            holdout,
                            forecast(history, series.horizon, series.season),
                        )["mase"]
                        for history, holdout in origins_of(series, origins)
                    ]
                )
            )
            for _ in range(runs)
        ]
        per_series[series.name] = {
            "runs": [round(v, 4) for v in values],
            "min": round(min(values), 4),
            "median": round(statistics.median(values), 4),
            "max": round(max(values), 4),
        }
        print(f"  unseeded AutoTS on {series.name}: MASE {per_series[series.name]}", flush=True)
    return {"autots_unseeded_spread": per_series}


# --- the run --------------------------------------------------------------------------------

SECTIONS = ("accuracy", "anomaly", "scale")


def main() -> None:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small version of each section")
    parser.add_argument(
        "--split",
        choices=("test", "dev"),
        default="test",
        help="accuracy on the held-out test sets (the headline) or the development sets",
    )
    parser.add_argument("--scale", type=int, default=10_000, help="series in the scale section")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--columns",
        default=",".join(DEFAULT_COLUMNS),
        help=f"comma-separated accuracy columns, from {','.join(models())}",
    )
    parser.add_argument(
        "--series", default="", help="comma-separated series of the split (default all)"
    )
    parser.add_argument(
        "--origins", type=int, default=ORIGINS, help="holdouts per series (its last horizons)"
    )
    parser.add_argument(
        "--unseeded", type=int, default=0, help="runs of AutoTS without a seed, for the spread"
    )
    args = parser.parse_args()
    columns = [name.strip() for name in args.columns.split(",") if name.strip()]
    if not columns or set(columns) - set(models()):
        parser.error(f"--columns {args.columns!r}: choose from {','.join(models())}")
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or set(sections) - set(SECTIONS):
        parser.error(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")
    QUICK = args.quick
    count = 300 if args.quick and args.scale == 10_000 else args.scale

    import deepspark as ds

    spark = ds.init_context(cores=2, app_name="bench-timeseries")
    load_before = os.getloadavg()[0]
    print(f"deepspark time series benchmark, {today()}, {machine()}, load {load_before:.1f}")
    result: dict = {
        "benchmark": "timeseries",
        "date": today(),
        "machine": machine(),
        "quick": args.quick,
        "sections": sections,
        "load_avg_start": round(load_before, 2),
    }
    measured: dict = {}
    try:
        if "accuracy" in sections:
            names = [name.strip() for name in args.series.split(",") if name.strip()] or None
            accuracy = accuracy_section(
                args.split, columns, args.unseeded, names, measured, args.origins
            )
            result |= accuracy_json(accuracy)
        if "anomaly" in sections:
            from timeseries_anomaly import anomaly_json, anomaly_section

            result |= anomaly_json(anomaly_section(args.quick))
        if "scale" in sections:
            from timeseries_scale import scale_json, scale_section

            result |= scale_json(scale_section(spark, count))
    except BaseException as error:
        # a run that failed is logged too, with what it had measured
        result["error"] = f"{type(error).__name__}: {error}"[:500]
        if measured and "accuracy" not in result:
            result["accuracy_measured_before_the_error"] = {
                series: {m: {k: round(v, 4) for k, v in r.items()} for m, r in per.items()}
                for series, per in measured.items()
            }
        raise
    finally:
        ds.stop_context()
        result["load_avg_end"] = round(os.getloadavg()[0], 2)
        emit_json(result)


def accuracy_json(accuracy: dict) -> dict:
    rounded = {
        s: {m: {k: round(v, 4) for k, v in r.items()} for m, r in per.items()}
        for s, per in accuracy["per_series"].items()
    }
    forecasts = {
        series: {
            model: [
                {
                    "mase": round(run["mase"], 4),
                    "forecast": [float(f"{v:.5g}") for v in np.asarray(run["forecast"], float)],
                }
                for run in runs
            ]
            for model, runs in per.items()
        }
        for series, per in accuracy["per_origin"].items()
    }
    return {
        "accuracy_split": accuracy["split"],
        "accuracy_origins": accuracy["origins"],
        "accuracy_per_origin": forecasts,
        "accuracy_series": accuracy["series"],
        "accuracy": rounded,
        "accuracy_seconds": {m: round(v, 1) for m, v in accuracy["seconds"].items()},
        **{k: v for k, v in accuracy.items() if k.startswith(("autots", "target", "best_"))},
        **({"autots_networks_configs": NETWORKS_CONFIGS} if NETWORKS_CONFIGS else {}),
        **({"autots_arima_configs": ARIMA_CONFIGS} if ARIMA_CONFIGS else {}),
        **({"autots_no_arima_configs": NO_ARIMA_CONFIGS} if NO_ARIMA_CONFIGS else {}),
    }


if __name__ == "__main__":
    run_logged("timeseries", main)
