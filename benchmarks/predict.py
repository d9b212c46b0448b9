"""Inference speed: deepspark against single-process PyTorch and PySpark's `predict_batch_udf`.

One run, same data, same 2 cores, for two models: an MLP on 64 features and a small CNN on
28x28 images.

* single process: plain PyTorch on in-memory tensors, batches of 1024 rows, with 1 or 2
  intra-op threads, whichever is faster (no Spark, no Arrow, no serialisation);
* deepspark: `deepspark.inference.predict` in a `local[2]` session (2 tasks x 1 thread);
* predict_batch_udf: `pyspark.ml.functions.predict_batch_udf` with the same model, batch size
  and threads, in the same session.

Both Spark paths read the same cached DataFrame (id + a float array column) and write their
output (the id and the prediction) to Spark's `noop` sink, so the whole pass runs and nothing
is collected. Each path runs once to warm up (Python workers, model loads), then twice timed;
the faster run counts.

Targets: deepspark >= 0.9x single-process rows/s and >= 1.3x predict_batch_udf's.
The last line printed is one JSON object with the figures and ratios.

Usage: python benchmarks/predict.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from _common import emit_json, machine, print_table, today

BATCH_SIZE = 1024
CORES = 2


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).eval()  # fmt: skip


def make_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 5 * 5, 10),
    ).eval()  # fmt: skip


@dataclass
class Case:
    name: str
    make_model: Callable[[], torch.nn.Module]
    row_shape: tuple[int, ...]
    rows: int


def make_frame(spark, rows: int, row_shape: tuple[int, ...], seed: int):
    """A cached DataFrame ``id, features`` and the same features as one in-memory tensor."""
    width = int(np.prod(row_shape))
    values = np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "features": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
        }
    )
    df = spark.createDataFrame(table).repartition(2 * CORES).cache()
    df.count()
    return df, torch.from_numpy(values.reshape(rows, *row_shape))


def timed(run: Callable[[], None], repeats: int = 2) -> float:
    run()  # warm-up: Python workers, model loads, allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def single_process(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[float, int]:
    """The best of 1 and CORES intra-op threads (on 2 small vCPUs one thread often wins)."""
    results = []
    for threads in sorted({1, CORES}):
        torch.set_num_threads(threads)

        def run() -> None:
            with torch.inference_mode():
                for start in range(0, len(inputs), BATCH_SIZE):
                    model(inputs[start : start + BATCH_SIZE])

        results.append((timed(run), threads))
    torch.set_num_threads(CORES)
    return min(results)


def deepspark_predict(df, model: torch.nn.Module, row_shape) -> float:
    from deepspark.inference import predict

    scored = predict(
        df, model, "features", batch_size=BATCH_SIZE, passthrough_cols=["id"],
        feature_shapes={"features": row_shape}, output="array",
    )  # fmt: skip
    return timed(lambda: scored.write.format("noop").mode("overwrite").save())


def predict_batch_udf_run(df, model: torch.nn.Module, row_shape) -> float:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    def make_predict_fn():
        torch.set_num_threads(1)  # one task, one core: as deepspark's tasks run

        def predict_fn(inputs: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(inputs)).numpy()

        return predict_fn

    udf = predict_batch_udf(
        make_predict_fn,
        return_type=ArrayType(FloatType()),
        batch_size=BATCH_SIZE,
        input_tensor_shapes=[list(row_shape)],
    )
    scored = df.select("id", udf("features").alias("prediction"))
    return timed(lambda: scored.write.format("noop").mode("overwrite").save())


def check_agreement(df, model: torch.nn.Module, inputs: torch.Tensor, row_shape) -> None:
    from deepspark.inference import predict

    sample = df.orderBy("id").limit(64)
    rows = predict(sample, model, "features", feature_shapes={"features": row_shape}).collect()
    ids = [row.id for row in rows]
    with torch.inference_mode():
        expected = model(inputs[ids])
    got = torch.tensor([row.prediction for row in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def run_case(spark, case: Case, seed: int) -> dict[str, float]:
    model = case.make_model()
    df, inputs = make_frame(spark, case.rows, case.row_shape, seed)
    check_agreement(df, model, inputs, case.row_shape)
    single_seconds, single_threads = single_process(model, inputs)
    seconds = {
        "single_process": single_seconds,
        "deepspark": deepspark_predict(df, model, case.row_shape),
        "predict_batch_udf": predict_batch_udf_run(df, model, case.row_shape),
    }
    df.unpersist()
    rates = {name: case.rows / value for name, value in seconds.items()}
    return {
        "rows": case.rows,
        "single_process_threads": single_threads,
        "single_process_rows_per_s": round(rates["single_process"]),
        "predict_batch_udf_rows_per_s": round(rates["predict_batch_udf"]),
        "deepspark_rows_per_s": round(rates["deepspark"]),
        "ratio_vs_single_process": round(rates["deepspark"] / rates["single_process"], 3),
        "ratio_vs_predict_batch_udf": round(rates["deepspark"] / rates["predict_batch_udf"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, for CI and laptops")
    args = parser.parse_args()

    import deepspark as ds

    cases = [
        Case("mlp", make_mlp, (64,), 100_000 if args.quick else 1_000_000),
        Case("cnn", make_cnn, (1, 28, 28), 10_000 if args.quick else 100_000),
    ]
    spark = ds.init_context(cores=CORES, driver_memory="4g", app_name="benchmark-predict")
    spark.sparkContext.setLogLevel("ERROR")
    results: dict[str, object] = {
        "benchmark": "predict",
        "quick": args.quick,
        "cores": CORES,
        "batch_size": BATCH_SIZE,
        "date": today(),
        "machine": machine(),
        "torch": torch.__version__,
    }
    results["load_average_1m_before"] = round(os.getloadavg()[0], 2)
    try:
        for seed, case in enumerate(cases):
            for key, value in run_case(spark, case, seed).items():
                results[f"{case.name}_{key}"] = value
    finally:
        ds.stop_context()
    # Other processes on the machine slow every path; the figures are only as quiet as this.
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    print()
    print_table(
        ["model", "rows", "single process rows/s", "predict_batch_udf rows/s",
         "deepspark rows/s", "vs single process", "vs predict_batch_udf"],
        [
            [case.name, *(results[f"{case.name}_{key}"] for key in _TABLE_KEYS)]
            for case in cases
        ],
    )  # fmt: skip
    emit_json(results)


_TABLE_KEYS = (
    "rows",
    "single_process_rows_per_s",
    "predict_batch_udf_rows_per_s",
    "deepspark_rows_per_s",
    "ratio_vs_single_process",
    "ratio_vs_predict_batch_udf",
)


if __name__ == "__main__":
    main()
