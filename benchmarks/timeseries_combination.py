"""How AutoTS would have scored with `combine=True`, from a logged development run.

A `timeseries.py --split dev` run with the columns AutoTS (the best candidate alone) and
"AutoTS networks" (no statistical candidates; the same seeded search) logs, per series and
origin, each column's forecast and AutoTS's validation losses. The combination's forecast is
the mean of the candidates that beat seasonal naive on validation: the networks' forecast
when they passed, and the AutoETS and AutoTheta columns' forecasts (statsforecast on the same
history, as `StatsForecaster` fits it) when they passed; raised to 0 for series that are never
negative, as AutoTS's ``floor="auto"`` does. This decided `AutoTS(combine=)`'s default on the
development sets only; the held-out run measures the library's own pipeline.

Usage: python benchmarks/timeseries_combination.py [logged_at]  (default: the last dev run
that has both columns); prints a table and the target shares of each rule.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from timeseries import mase
from timeseries_sets import development_sets
from timeseries_targets import STATSFORECAST, compare

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log.jsonl")


def dev_line(logged_at: str | None) -> dict:
    """The log line of `logged_at`, or the last dev run with both AutoTS columns."""
    found = None
    with open(LOG) as file:
        for text in file:
            line = json.loads(text)
            result = line.get("result", {})
            per = result.get("accuracy_per_origin") or {}
            has_both = any("AutoTS networks" in models for models in per.values())
            wanted = logged_at is None or line["logged_at"].startswith(logged_at)
            if result.get("accuracy_split") == "dev" and has_both and wanted:
                found = line if not result.get("quick") else found
    if found is None:
        raise SystemExit(f"no dev run with AutoTS and 'AutoTS networks' logged ({logged_at})")
    return found


def passing(check: dict) -> list[str]:
    """The candidates that beat seasonal naive as `fallback` (0.01) asks."""
    names = ["networks"] if _networks_pass(check) else []
    for name, entry in (check.get("statistical") or {}).items():
        if entry and entry["difference"] < -max(
            entry["standard_error"], 0.01 * entry["seasonal_naive"]
        ):
            names.append(name)
    return names


def _networks_pass(check: dict) -> bool:
    margin = max(check["standard_error"], 0.01 * check["seasonal_naive"])
    return check["difference"] < -margin


def main() -> None:
    line = dev_line(sys.argv[1] if len(sys.argv) > 1 else None)
    result = line["result"]
    per_origin = result["accuracy_per_origin"]
    configs = {(c["series"], c["origin"]): c for c in result["autots_configs"]}
    sets = {s.name: s for s in development_sets(list(per_origin))}
    rows, shares = [], {"select": [0, 0], "combine": [0, 0], "networks": [0, 0]}
    for name, models in per_origin.items():
        series = sets[name]
        values = series.frame["y"].to_numpy()
        scores: dict[str, list[float]] = {"combine": []}
        for origin, check in sorted(
            (o, configs[(name, o)]["naive_check"]) for (s, o) in configs if s == name
        ):
            end = len(values) - (origin + 1) * series.horizon
            history, holdout = values[:end], values[end : end + series.horizon]
            candidates = passing(check)
            forecasts = []
            for candidate in candidates:
                column = "AutoTS networks" if candidate == "networks" else candidate
                forecasts.append(np.asarray(models[column][origin]["forecast"], float))
            combined = (
                np.mean(forecasts, axis=0)
                if forecasts
                else np.asarray(models["SeasonalNaive"][origin]["forecast"], float)
            )
            if history.min() >= 0:
                combined = np.maximum(combined, 0.0)
            scores["combine"].append(mase(holdout, combined, history, series.season))
        mean = {m: float(np.mean([r["mase"] for r in runs])) for m, runs in models.items()}
        mean["combine"] = float(np.mean(scores["combine"]))
        best = min(v for m, v in mean.items() if m in STATSFORECAST)
        for rule, column in (
            ("select", "AutoTS"),
            ("combine", "combine"),
            ("networks", "AutoTS networks"),
        ):
            _, no_worse, better = compare(mean, column)
            shares[rule][0] += no_worse
            shares[rule][1] += better
        rows.append(
            (
                name,
                mean["SeasonalNaive"],
                best,
                mean["AutoTS"],
                mean["AutoTS networks"],
                mean["combine"],
            )
        )
    print(f"dev run {line['logged_at']} ({line['commit']}), MASE averaged over the origins")
    heads = ("naive", "best sf", "select", "networks", "combine")
    print(f"{'series':18s} " + " ".join(f"{head:>8s}" for head in heads))
    for row in rows:
        print(f"{row[0]:18s} " + " ".join(f"{v:8.3f}" for v in row[1:]))
    count = len(rows)
    for rule, (naive, best) in shares.items():
        print(f"{rule:9s} <= SeasonalNaive {naive}/{count}, < best statsforecast {best}/{count}")


if __name__ == "__main__":
    main()
