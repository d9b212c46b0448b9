"""Anomaly detectors ranked against simple rules, on a development and a held-out labelled set.

Every method gives each point a score (higher: more anomalous); average precision and ROC-AUC
(scikit-learn) rank those scores against the labels, so no threshold is chosen from the
labels. The detectors run at their defaults, with settings fixed before any label was read
(an autoencoder over 16-point windows, a DLinear forecaster's residual, the distance from a
rolling median). Baselines: a trailing rolling z-score and a trailing interquartile-range
rule (Tukey's fences, as distance beyond them in IQRs). The Yahoo series chose the detectors'
old thresholds, so it is development data. Held out: the MIT-BIH ECG excerpt (one labelled
event) and NAB's seven `realKnownCause` series (19 labelled windows; `benchmarks/data/nab`).
Target: on NAB, the best detector's average precision, averaged over the seven series, >= the
best baseline's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from _common import print_table
from timeseries_sets import anomaly_development_set, anomaly_test_set, anomaly_test_sets

WINDOW = 50  # the baselines' trailing window, in points
BASELINES = ("rolling z-score (baseline)", "rolling IQR (baseline)")
NAB = "nab/"  # the held-out NAB series' names start with it


def rolling_z_score(values: pd.Series, window: int = WINDOW) -> np.ndarray:
    """|y - mean| / std of the previous `window` points."""
    rolling = values.rolling(window, min_periods=10)
    z = (values - rolling.mean().shift(1)) / rolling.std().shift(1)
    return z.abs().fillna(0.0).to_numpy()


def rolling_iqr(values: pd.Series, window: int = WINDOW) -> np.ndarray:
    """How far y lies outside the previous `window` points' quartiles, in IQRs (0 inside)."""
    rolling = values.rolling(window, min_periods=10)
    low, high = rolling.quantile(0.25).shift(1), rolling.quantile(0.75).shift(1)
    spread = (high - low).replace(0.0, np.nan)
    beyond = np.maximum(low - values, values - high).clip(lower=0.0) / spread
    return beyond.fillna(0.0).to_numpy()


def detectors(quick: bool) -> dict[str, Callable[[pd.DataFrame], np.ndarray]]:
    """name -> (frame with ds, y) -> one score per point."""
    from deepspark.timeseries import DLinearForecaster, TSDataset
    from deepspark.timeseries.anomaly import ThresholdDetector
    from deepspark.timeseries.anomaly_models import AEDetector, ForecastResidualDetector

    epochs = 5 if quick else 20

    def autoencoder(frame: pd.DataFrame) -> np.ndarray:
        return AEDetector(epochs=epochs).fit(frame).score(frame)["score"].to_numpy()

    def residual(frame: pd.DataFrame) -> np.ndarray:
        data = TSDataset.from_pandas(frame, dt_col="ds", target_col="y")
        forecaster = DLinearForecaster(lookback=32, horizon=4, lr=1e-2, loss="mae")
        detector = ForecastResidualDetector(forecaster)
        detector.fit(data, epochs=epochs, num_workers=1, progress=False)
        return detector.score(data)["score"].to_numpy()

    def median_distance(frame: pd.DataFrame) -> np.ndarray:
        median = frame["y"].rolling(25, center=True, min_periods=1).median()
        scored = ThresholdDetector(ratio=0.01, forecast_col="median").score(
            frame.assign(median=median)
        )
        return scored["score"].to_numpy()

    return {
        BASELINES[0]: lambda frame: rolling_z_score(frame["y"]),
        BASELINES[1]: lambda frame: rolling_iqr(frame["y"]),
        "AEDetector": autoencoder,
        "ForecastResidual DLinear": residual,
        "Threshold |y - rolling median|": median_distance,
    }


def ranking(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.nan_to_num(np.asarray(scores, float), nan=0.0)
    if labels.min() == labels.max():
        raise ValueError("ranking: the labels hold one class only, so nothing can be ranked")
    return {
        "average_precision": float(average_precision_score(labels, scores)),
        "roc_auc": float(roc_auc_score(labels, scores)),
    }


def anomaly_section(quick: bool) -> dict:
    sets = {"yahoo (development)": anomaly_development_set(), "mitdb (test)": anomaly_test_set()}
    sets |= {f"{NAB}{name} (test)": frame for name, frame in anomaly_test_sets().items()}
    results: dict[str, dict] = {}
    for set_name, frame in sets.items():
        if quick:  # 2,000 points, from 1,000 before the first labelled one
            first = int(np.argmax(frame["label"].to_numpy() > 0))
            frame = frame.iloc[max(0, first - 1000) :][:2000]
        labels = frame["label"].to_numpy().astype(int)
        results[set_name] = {"points": len(frame), "anomalies": int(labels.sum())}
        rows = []
        for name, run in detectors(quick).items():
            start = time.perf_counter()
            scores = run(frame[["ds", "y"]].reset_index(drop=True))
            got = ranking(scores, labels) | {"seconds": time.perf_counter() - start}
            results[set_name][name] = got
            rows.append([name, got["average_precision"], got["roc_auc"], got["seconds"]])
        print(f"\n{set_name}: {len(frame):,} points, {labels.sum()} labelled anomalous")
        print_table(["method", "average precision", "ROC-AUC", "seconds"], rows)
    return results


def anomaly_json(results: dict) -> dict:
    summary = {}
    for set_name, per in results.items():
        methods = {k: v for k, v in per.items() if isinstance(v, dict)}
        best_baseline = max(methods[b]["average_precision"] for b in BASELINES)
        best_detector = max(
            v["average_precision"] for k, v in methods.items() if k not in BASELINES
        )
        summary[set_name] = {
            "points": per["points"],
            "anomalies": per["anomalies"],
            **{
                k: {m: round(x, 4) for m, x in v.items() if m != "seconds"}
                for k, v in methods.items()
            },
            "best_detector_ap_minus_best_baseline_ap": round(best_detector - best_baseline, 4),
        }
    nab = nab_means(summary)
    return {
        "anomaly": summary,
        "anomaly_nab_mean": nab,
        "anomaly_target_met_on_test": nab["best_detector_ap_minus_best_baseline_ap"] >= 0,
    }


def nab_means(summary: dict) -> dict:
    """Each method's average precision and ROC-AUC averaged over the NAB series, and the
    target's gap: the best detector's mean average precision minus the best baseline's."""
    series = [per for name, per in summary.items() if name.startswith(NAB)]
    methods = [name for name, value in series[0].items() if isinstance(value, dict)]
    means = {
        method: {
            metric: round(float(np.mean([per[method][metric] for per in series])), 4)
            for metric in ("average_precision", "roc_auc")
        }
        for method in methods
    }
    best_baseline = max(means[b]["average_precision"] for b in BASELINES)
    best_detector = max(v["average_precision"] for k, v in means.items() if k not in BASELINES)
    print(f"\nNAB, {len(series)} series, means:")
    print_table(
        ["method", "mean average precision", "mean ROC-AUC"],
        [[k, v["average_precision"], v["roc_auc"]] for k, v in means.items()],
    )
    return {
        "series": len(series),
        **means,
        "best_detector_ap_minus_best_baseline_ap": round(best_detector - best_baseline, 4),
    }
