"""How AutoTS's seasonal-naive check would have chosen with an overlap-aware standard error,
from logged development runs (the decision of stop 37).

The check keeps a candidate (the networks' mean forecast, each statistical model) when its
mean validation loss beats seasonal naive's by more than 1% and by one standard error of the
per-window differences. Until stop 37 that error took the windows as independent, but windows
one step apart share ``horizon - 1`` steps. The third held-out read showed candidates passing
on 4 to 18 windows and losing to seasonal naive on the holdout. This script rescores the
logged checks with `overlapping_standard_error` (each run fits one series, so its windows are
one series' windows) and forecasts the mean of the candidates that pass, from the logged
forecasts:

- the statistical candidates' forecasts are the run's statsforecast columns (the same models
  on the same history, as `StatsForecaster` fits them);
- the networks' forecast is the "AutoTS networks" column where the run has one (the same
  seeded search); otherwise it is backed out of the AutoTS column, which is the mean of the
  candidates in ``naive_check["forecast"]``;
- raised to 0 for series that are never negative, as ``floor="auto"`` does.

It reads the development runs only: the 13-series run of `logged_at 2026-12-08T00:15:54`
(AutoARIMA a candidate) and the second held-out set's read (`2026-12-07T21:56:50`, now
development data; AutoETS and AutoTheta the candidates then). "old" reproduces the library's
column on every series but solar, whose AutoETS column is an MSTL (its season is 48) while
AutoTS's candidate is statsforecast's AutoETS; "new" is the overlap-aware rule.

Usage: python benchmarks/timeseries_overlap.py
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from timeseries import mase
from timeseries_sets import development_sets
from timeseries_targets import compare

from deepspark.timeseries.forecast_metrics import overlapping_standard_error

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log.jsonl")
RUNS = (("2026-12-08T00:15:54", "AutoTS +ARIMA"), ("2026-12-07T21:56:50", "AutoTS"))
MARGIN = 0.01  # AutoTS(fallback=0.01)
STATISTICAL = ("AutoETS", "AutoTheta", "AutoARIMA")


def passes(entry: dict | None, horizon: int, rule: str) -> bool:
    """Whether a logged comparison passes the check under `rule` ("old" or "new")."""
    if not entry:
        return False
    count, error = entry["windows"], entry["standard_error"]
    if rule == "new":
        # the logged error is s / sqrt(n): recover the squared deviations, then count overlap
        squares = error**2 * count * (count - 1)
        error = overlapping_standard_error(squares, [count], horizon)[0] if count > 1 else math.inf
    return entry["difference"] < -max(error, MARGIN * entry["seasonal_naive"])


def forecasts_of(models: dict, origin: int, check: dict, column: str) -> dict[str, np.ndarray]:
    """Each candidate's logged forecast at `origin` (the networks' backed out if need be)."""
    found = {
        name: np.asarray(models[name][origin]["forecast"], float)
        for name in (*STATISTICAL, "SeasonalNaive")
    }
    if "AutoTS networks" in models:
        found["networks"] = np.asarray(models["AutoTS networks"][origin]["forecast"], float)
    elif "networks" in check["forecast"]:
        used = check["forecast"]
        mean = np.asarray(models[column][origin]["forecast"], float)
        found["networks"] = mean * len(used) - sum(found[u] for u in used if u != "networks")
    return found


def main() -> None:
    with open(LOG) as file:
        lines = [json.loads(text) for text in file]
    totals: dict[tuple[str, str], list] = {}
    for logged_at, column in RUNS:
        result = next(ln for ln in lines if ln["logged_at"].startswith(logged_at))["result"]
        per_origin = result["accuracy_per_origin"]
        configs = {(c["series"], c["origin"]): c["naive_check"] for c in result["autots_configs"]}
        sets = {s.name: s for s in development_sets(list(per_origin))}
        for name, models in per_origin.items():
            series = sets[name]
            values, horizon = series.frame["y"].to_numpy(), series.horizon
            scores: dict[str, list[float]] = {"old": [], "new": []}
            for origin in range(len(models["SeasonalNaive"])):
                check = configs[(name, origin)]
                end = len(values) - (origin + 1) * horizon
                history, holdout = values[:end], values[end : end + horizon]
                found = forecasts_of(models, origin, check, column)
                for rule in scores:
                    chosen = ["networks"] if passes(check, horizon, rule) else []
                    statistical = check.get("statistical") or {}
                    chosen += [m for m, e in statistical.items() if passes(e, horizon, rule)]
                    chosen = [c for c in chosen if c in found]
                    mean = (
                        np.mean([found[c] for c in chosen], axis=0)
                        if chosen
                        else found["SeasonalNaive"]
                    )
                    if history.min() >= 0:
                        mean = np.maximum(mean, 0.0)
                    scores[rule].append(mase(holdout, mean, history, series.season))
            mean_mase = {m: float(np.mean([r["mase"] for r in v])) for m, v in models.items()}
            mean_mase |= {rule: float(np.mean(v)) for rule, v in scores.items()}
            print(
                f"{name:18s} naive {mean_mase['SeasonalNaive']:6.3f} library "
                f"{mean_mase[column]:6.3f} old {mean_mase['old']:6.3f} new {mean_mase['new']:6.3f}"
            )
            for rule in ("old", "new", column):
                _, no_worse, better = compare(mean_mase, rule)
                total = totals.setdefault((logged_at, rule), [0, 0, []])
                total[0] += no_worse
                total[1] += better
                total[2].append(mean_mase[rule] / mean_mase["SeasonalNaive"])
    for (logged_at, rule), (no_worse, better, ratios) in totals.items():
        count = len(ratios)
        print(
            f"{logged_at} {rule:14s} <= SeasonalNaive {no_worse}/{count}, < best statsforecast "
            f"{better}/{count}, geometric mean {math.exp(np.mean(np.log(ratios))):.3f}, "
            f"worst {max(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
