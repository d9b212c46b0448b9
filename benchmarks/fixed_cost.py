"""What a fit costs beyond its epochs (issue #14): fresh and warm sessions, first step, cache.

One run, one machine, the same data and model for every figure:

* fixed cost on a fresh session: the first `fit` after `init_context` in this process,
  ``total - epochs - validation`` of `Estimator.timings_`;
* fixed cost on a warm session: the median over three later fits of the same;
* time to first step with 10x more rows per partition than 1x (both on warm workers, each the
  median of three fits; the partition is streamed, so the ratio should stay near 1);
* the first epoch of a fit on a DataFrame kept by `deepspark.cache` against the first epoch of a
  fit on the same DataFrame uncached, for two plans: a Parquet read with an array assembly,
  and the same followed by a pandas UDF feature step; Spark runs and converts either again for
  every uncached fit. Also the time rank 0's partition took to arrive (``input_read``), the
  JVM's share, which the streamed first epoch overlaps with training. Same warm-up fit before
  each measured fit.

The last line printed is one JSON object with the figures and ratios.

With ``--fixed-cost-only`` it stops after the fixed cost (fresh and warm), for
`commits.py`, which compares two commits on that figure; ``--warm-fits N`` takes the warm
median over N fits instead of 3 (a warm fit's fixed cost varies by about 0.1 s here).

Usage: python benchmarks/fixed_cost.py [--quick] [--fixed-cost-only] [--warm-fits N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from _common import emit_json, machine, run_logged, today

FEATURES, CLASSES = 64, 10


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, CLASSES)
    )


def fit(df, epochs: int = 2):
    import deepspark as ds

    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=make_model(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        loss=torch.nn.CrossEntropyLoss(),
    )
    history = est.fit(
        df, "features", "label", epochs=epochs, batch_size=256, num_workers=2, progress=False
    )
    return est, history


def fixed_cost(est) -> float:
    timings = est.timings_
    return timings["total"] - timings["epochs"] - timings["validation"]


def frame(spark, rows: int, seed: int):

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    y = (np.abs(x[:, :CLASSES]).argmax(axis=1)).astype(np.int64)
    pdf = pd.DataFrame({"features": list(x), "label": y})
    df = spark.createDataFrame(pdf, "features array<float>, label long").repartition(2).cache()
    df.count()
    return df


def parquet_frame(spark, rows: int, directory: str):
    """A DataFrame whose every evaluation reads Parquet and assembles the feature array."""
    from pyspark.sql import functions as F

    rng = np.random.default_rng(3)
    columns = [f"f{index}" for index in range(FEATURES)]

    pdf = pd.DataFrame(rng.standard_normal((rows, FEATURES)).astype(np.float32), columns=columns)
    pdf["label"] = pdf[columns[:CLASSES]].abs().to_numpy().argmax(axis=1)
    path = os.path.join(directory, "data.parquet")
    spark.createDataFrame(pdf).repartition(2).write.parquet(path)
    source = spark.read.parquet(path)
    return source.select(
        F.array(*[F.col(name).cast("float") for name in columns]).alias("features"),
        F.col("label").cast("long").alias("label"),
    )


def with_udf(df):
    """The same rows after a pandas UDF step (a feature transform written in Python)."""
    from pyspark.sql import functions as F

    @F.pandas_udf("array<float>")
    def clipped(features: pd.Series) -> pd.Series:
        return features.map(lambda values: np.clip(values, -2.0, 2.0).astype(np.float32))

    return df.select(clipped("features").alias("features"), "label")


def cache_run(ds, source, name: str) -> dict:
    """First epochs of a fit on `source` uncached, then cached; the same warm-up before each."""
    fit(source, epochs=1)  # warm-up, uncached
    uncached_est, uncached = fit(source, epochs=2)
    handle = ds.cache(source)
    fit(source, epochs=1)  # the same warm-up, cached
    cached_est, cached = fit(source, epochs=2)
    handle.unpersist()
    first_uncached = float(uncached["seconds"].iloc[0])
    first_cached = float(cached["seconds"].iloc[0])
    read_uncached = uncached_est.timings_["input_read"]
    read_cached = cached_est.timings_["input_read"]
    return {
        f"{name}_rows": handle.rows,
        f"{name}_cache_bytes": handle.bytes,
        f"{name}_uncached_first_epoch_s": round(first_uncached, 3),
        f"{name}_cached_first_epoch_s": round(first_cached, 3),
        f"{name}_ratio_cached_vs_uncached_first_epoch": round(first_cached / first_uncached, 3),
        f"{name}_uncached_later_epoch_s": round(float(uncached["seconds"].iloc[1]), 3),
        f"{name}_cached_later_epoch_s": round(float(cached["seconds"].iloc[1]), 3),
        # how long rank 0's partition took to arrive: the JVM's share, alongside training
        f"{name}_uncached_input_read_s": round(read_uncached, 3),
        f"{name}_cached_input_read_s": round(read_cached, 3),
        f"{name}_ratio_cached_vs_uncached_input_read": round(read_cached / read_uncached, 3),
    }


def first_step_run(spark, small, rows: int) -> dict:
    """Time to first step with 1x and 10x rows per partition, both on warm workers."""
    large = frame(spark, rows * 10, seed=1)
    fit(large, epochs=1)  # the same warm-up for both sizes: one fit each
    fit(small, epochs=1)
    first_small = statistics.median(fit(small, epochs=1)[0].first_step_s_ for _ in range(3))
    first_large = statistics.median(fit(large, epochs=1)[0].first_step_s_ for _ in range(3))
    large.unpersist()
    return {
        "first_step_s_1x": round(first_small, 3),
        "first_step_s_10x": round(first_large, 3),
        "ratio_first_step_10x_vs_1x": round(first_large / first_small, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data (about 3 minutes)")
    parser.add_argument(
        "--warm-fits", type=int, default=3, help="warm fits in the warm figure's median"
    )
    parser.add_argument(
        "--fixed-cost-only",
        action="store_true",
        help="measure the fixed cost only, not the first step or the cache",
    )
    args = parser.parse_args()
    rows = 20_000 if args.quick else 100_000
    cached_rows = 200_000 if args.quick else 1_000_000
    load_before = os.getloadavg()[0]

    import deepspark as ds

    started = time.perf_counter()
    spark = ds.init_context(cores=2, app_name="bench-fixed-cost")
    init_s = time.perf_counter() - started
    small = frame(spark, rows, seed=0)

    fresh, _ = fit(small)  # the first fit of this session: Python workers start cold
    warm = [fit(small)[0] for _ in range(args.warm_fits)]
    warm_costs = [fixed_cost(est) for est in warm]
    median_est = warm[int(np.argsort(warm_costs)[len(warm_costs) // 2])]

    first_step_figures, cache_figures = {}, {}
    if not args.fixed_cost_only:
        first_step_figures = first_step_run(spark, small, rows)
    small.unpersist()
    if hasattr(ds, "cache") and not args.fixed_cost_only:
        with tempfile.TemporaryDirectory() as directory:
            plain = parquet_frame(spark, cached_rows, directory)
            cache_figures.update(cache_run(ds, plain, "parquet"))
            cache_figures.update(cache_run(ds, with_udf(plain), "parquet_udf"))
    ds.stop_context()

    figures = {
        "benchmark": "fixed_cost",
        "quick": args.quick,
        "date": today(),
        "machine": machine(),
        "torch": torch.__version__,
        "rows": rows,
        "init_context_s": round(init_s, 3),
        "fresh_fixed_cost_s": round(fixed_cost(fresh), 3),
        "fresh_timeline_s": {name: round(value, 3) for name, value in fresh.timings_.items()},
        "warm_fixed_cost_s": round(statistics.median(warm_costs), 3),
        "warm_fits": args.warm_fits,
        "warm_fixed_costs_s": [round(cost, 3) for cost in warm_costs],
        "warm_timeline_s": {name: round(value, 3) for name, value in median_est.timings_.items()},
        "fixed_cost_only": args.fixed_cost_only,
        **first_step_figures,
        **cache_figures,
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    print(f"{'':40}{'seconds':>10}")
    print(f"{'fixed cost, fresh session':40}{figures['fresh_fixed_cost_s']:>10.3f}")
    warm_label = f"fixed cost, warm session (median of {args.warm_fits})"
    print(f"{warm_label:40}{figures['warm_fixed_cost_s']:>10.3f}")
    for name, value in {**first_step_figures, **cache_figures}.items():
        print(f"{name:40}{value:>10}")
    print("warm fit timeline:")
    for name, value in median_est.timings_.items():
        print(f"  {name:38}{value:>10.3f}")
    emit_json(figures)


if __name__ == "__main__":
    run_logged("fixed_cost", main)
