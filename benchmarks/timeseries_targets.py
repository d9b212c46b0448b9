"""The time-series benchmark's targets (issue 27), computed from a run's MASE per series:
AutoTS no worse than SeasonalNaive on >= 80% of the series, and better than the best
statsforecast model on >= 50%; and the same two shares for each AutoTS column of a run."""

from __future__ import annotations

STATSFORECAST = ("SeasonalNaive", "AutoETS", "AutoARIMA", "AutoTheta", "MSTL")


def compare(mase: dict[str, float], column: str) -> tuple[str, bool, bool]:
    """One series' checks of `column` (``{model: MASE}``): the best statsforecast model's
    name, whether `column` is no worse than SeasonalNaive, and whether it beats that best."""
    best = min((m for m in mase if m in STATSFORECAST), key=mase.__getitem__)
    return best, mase[column] <= mase["SeasonalNaive"], mase[column] < mase[best]


def autots_targets(scores: dict[str, dict[str, dict[str, float]]], configs: list[dict]) -> dict:
    """The issue's targets on MASE, per series: AutoTS <= SeasonalNaive on >= 80% of the
    series, and < the best statsforecast model on >= 50%."""
    no_worse_than_naive, better_than_best, best_baseline = {}, {}, {}
    for series, per in scores.items():
        best_baseline[series], no_worse_than_naive[series], better_than_best[series] = compare(
            {m: r["mase"] for m, r in per.items()}, "AutoTS"
        )
    count = len(scores)
    naive_share = sum(no_worse_than_naive.values()) / count
    best_share = sum(better_than_best.values()) / count
    print(f"\nAutoTS configs: {configs}")
    print(f"AutoTS <= SeasonalNaive: {no_worse_than_naive} ({naive_share:.0%}, target 80%)")
    print(f"AutoTS < best statsforecast: {better_than_best} ({best_share:.0%}, target 50%)")
    return {
        "autots_configs": configs,
        "best_statsforecast": best_baseline,
        "autots_no_worse_than_seasonal_naive": no_worse_than_naive,
        "autots_better_than_best_statsforecast": better_than_best,
        "autots_no_worse_than_seasonal_naive_share": round(naive_share, 3),
        "autots_better_than_best_statsforecast_share": round(best_share, 3),
        "target_seasonal_naive_met": naive_share >= 0.8,
        "target_best_statsforecast_met": best_share >= 0.5,
    }


def variant_shares(scores: dict, columns: list[str]) -> dict:
    """Each AutoTS column's two target shares, to compare variants within one run."""
    shares = {}
    for column in columns:
        checks = [
            compare({m: r["mase"] for m, r in per.items()}, column)[1:]
            for per in scores.values()
            if column in per
        ]
        if checks:
            count = len(checks)
            naive = sum(no_worse for no_worse, _ in checks)
            better = sum(beats for _, beats in checks)
            shares[column] = {
                "no_worse_than_naive": naive / count,
                "better_than_best": better / count,
            }
            print(
                f"{column}: <= SeasonalNaive {naive}/{count}, < best statsforecast {better}/{count}"
            )
    return shares
