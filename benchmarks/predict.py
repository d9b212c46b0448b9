"""Inference speed: deepspark's two Spark paths against an expert's mapInArrow and PySpark's.

One run, same data, same 2 cores, for two models: an MLP on a 64-float array column and a
small CNN on 28x28 images. Each DataFrame also carries passthrough columns of several types
(id long, name string, weight double, ts timestamp) that every Spark path returns unchanged.

* single process: plain PyTorch on in-memory tensors, batches of 1024 rows, with 1 or 2
  intra-op threads, whichever is faster (no Spark, no Arrow, no serialisation);
* deepspark mapInArrow: `deepspark.inference.predict` through `DataFrame.mapInArrow` (every
  column goes to Python and back);
* deepspark arrow_udf: the same through an Arrow iterator UDF (Spark >= 4.1; only the
  feature column goes to Python, the passthrough columns stay in the JVM);
* expert mapInArrow: the in-Spark limit, a minimal hand-written `mapInArrow` function that
  loads the model once per Python worker and runs it on each Arrow batch (in 1024-row slices),
  passing the same columns through;
* predict_batch_udf: `pyspark.ml.functions.predict_batch_udf` with the same model, batch size
  and threads.

All Spark paths run in one `local[2]` session (2 tasks x 1 thread), read the same cached
DataFrame and write their output (passthrough columns and prediction) to Spark's `noop` sink,
so the whole pass runs and nothing is collected. Each path runs once to warm up (Python
workers, model loads); then the paths take turns, two rounds (three without --quick), and each
path's fastest run counts. "deepspark" is the path
`predict` takes by default in this session.

Targets (issue #14): deepspark >= 0.95x the expert mapInArrow's rows/s and >= 1.5x
predict_batch_udf's. The last line printed is one JSON object with the figures and ratios.

Usage: python benchmarks/predict.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from _common import emit_json, machine, print_table, run_logged, today

BATCH_SIZE = 1024
CORES = 2
PASSTHROUGH = ["id", "name", "weight", "ts"]
PATH_CONF = "deepspark.predict.path"


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
    """A cached DataFrame (passthrough columns and ``features``) and the features as a tensor."""
    width = int(np.prod(row_shape))
    generator = np.random.default_rng(seed)
    values = generator.standard_normal((rows, width), dtype=np.float32)
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    ids = np.arange(rows, dtype=np.int64)
    start = np.datetime64(datetime.datetime(2026, 1, 1), "us")
    table = pa.table(
        {
            "id": pa.array(ids),
            "name": pa.array([f"row-{i}" for i in range(rows)]),
            "weight": pa.array(generator.random(rows)),
            "ts": pa.array(start + ids.astype("timedelta64[s]"), pa.timestamp("us", tz="UTC")),
            "features": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
        }
    )
    df = spark.createDataFrame(table).repartition(2 * CORES).cache()
    df.count()
    return df, torch.from_numpy(values.reshape(rows, *row_shape))


def timed(run: Callable[[], None], repeats: int = 2) -> float:
    run()  # warm-up: allocator, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def timed_in_turn(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The best time of each run; every run warms up once, then they take turns.

    Taking turns spreads a change in the machine's load (other processes) over every path
    instead of charging it to whichever path happens to run then.
    """
    for run in runs.values():
        run()  # warm-up: Python workers, model loads, allocator
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def write_noop(df) -> Callable[[], None]:
    return lambda: df.write.format("noop").mode("overwrite").save()


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


def deepspark_scored(df, model: torch.nn.Module, row_shape, path: str | None):
    """``predict``'s DataFrame on ``path`` (None: the path it takes by default)."""
    from deepspark.inference import predict

    spark = df.sparkSession
    if path is None:
        spark.conf.unset(PATH_CONF)
    else:
        spark.conf.set(PATH_CONF, path)
    try:
        return predict(
            df, model, "features", batch_size=BATCH_SIZE, passthrough_cols=PASSTHROUGH,
            feature_shapes={"features": row_shape}, output="array",
        )  # fmt: skip
    finally:
        spark.conf.unset(PATH_CONF)


def expert_scored(df, model: torch.nn.Module, row_shape):
    """A minimal hand-written ``mapInArrow``: the model loaded once per Python worker."""
    from pyspark.sql.types import ArrayType, FloatType, StructField, StructType

    model_bytes = _state_of(model)
    key = f"{id(model)}-{len(model_bytes)}"

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        torch.set_num_threads(1)
        net = _worker_models().get(key)
        if net is None:
            net = _worker_models()[key] = _load_state(model_bytes)
        for batch in batches:
            rows = batch.num_rows
            features = batch.column("features").flatten().to_numpy(zero_copy_only=False)
            inputs = torch.from_numpy(features).reshape(rows, *row_shape)
            with torch.inference_mode():
                outputs = torch.cat(
                    [net(inputs[i : i + BATCH_SIZE]) for i in range(0, rows, BATCH_SIZE)]
                ).numpy()
            width = outputs.shape[1]
            offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
            prediction = pa.ListArray.from_arrays(offsets, pa.array(outputs.reshape(-1)))
            columns = [batch.column(name) for name in PASSTHROUGH]
            yield pa.RecordBatch.from_arrays([*columns, prediction], [*PASSTHROUGH, "prediction"])

    fields = {field.name: field for field in df.schema.fields}
    schema = StructType(
        [*(fields[name] for name in PASSTHROUGH),
         StructField("prediction", ArrayType(FloatType(), False), False)]
    )  # fmt: skip
    return df.select(*PASSTHROUGH, "features").mapInArrow(score, schema)


def _state_of(model: torch.nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)  # this benchmark's own model: trusted
    return buffer.getvalue()


def _load_state(model_bytes: bytes) -> torch.nn.Module:
    import io

    return torch.load(io.BytesIO(model_bytes), weights_only=False).eval()


def _worker_models() -> dict:
    """A dict that lives as long as the Python worker (Spark reuses workers across tasks).

    The function is pickled by value with the closure, so a module global would be new in
    each task; a module registered in ``sys.modules`` is not.
    """
    import sys
    import types

    module = sys.modules.get("_benchmark_predict_models")
    if module is None:
        module = types.ModuleType("_benchmark_predict_models")
        module.models = {}
        sys.modules[module.__name__] = module
    return module.models


def predict_batch_udf_scored(df, model: torch.nn.Module, row_shape):
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
    return df.select(*PASSTHROUGH, udf("features").alias("prediction"))


def check_agreement(scored_frames: dict, model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Every Spark path returns the same passthrough columns and the model's outputs."""
    with torch.inference_mode():
        expected = model(inputs)
    reference = None
    for name, scored in scored_frames.items():
        rows = scored.orderBy("id").limit(64).collect()
        ids = [row.id for row in rows]
        got = torch.tensor([row.prediction for row in rows])
        torch.testing.assert_close(got, expected[ids], atol=1e-5, rtol=0, msg=name)
        passthrough = [tuple(row)[: len(PASSTHROUGH)] for row in rows]
        assert reference is None or passthrough == reference, f"{name}: passthrough differs"
        reference = passthrough


def default_predict_path() -> str:
    """The path ``predict`` takes without the conf: arrow_udf where pyspark has it (>= 4.1)."""
    from pyspark.sql import functions

    return "arrow_udf" if hasattr(functions, "arrow_udf") else "mapInArrow"


_PATH_KEYS = {"arrow_udf": "deepspark_arrow_udf", "mapInArrow": "deepspark_map_in_arrow"}


def run_case(spark, case: Case, seed: int, repeats: int) -> dict[str, object]:
    model = case.make_model()
    df, inputs = make_frame(spark, case.rows, case.row_shape, seed)
    default_path = default_predict_path()
    scored = {
        _PATH_KEYS[path]: deepspark_scored(df, model, case.row_shape, path)
        for path in ("mapInArrow", "arrow_udf")
        if path == "mapInArrow" or default_path == "arrow_udf"  # Spark 3.5/4.0: no arrow_udf
    }
    scored["expert_map_in_arrow"] = expert_scored(df, model, case.row_shape)
    scored["predict_batch_udf"] = predict_batch_udf_scored(df, model, case.row_shape)
    check_agreement(scored, model, inputs)
    single_seconds, single_threads = single_process(model, inputs)
    seconds = {"single_process": single_seconds}
    runs = {name: write_noop(frame) for name, frame in scored.items()}
    seconds.update(timed_in_turn(runs, repeats))
    df.unpersist()
    rates = {name: case.rows / value for name, value in seconds.items()}
    rates["deepspark"] = rates[_PATH_KEYS[default_path]]
    result: dict[str, object] = {"rows": case.rows, "single_process_threads": single_threads}
    result["deepspark_path"] = default_path
    for name, rate in rates.items():
        result[f"{name}_rows_per_s"] = round(rate)
    for name in ["deepspark", *(key for key in _PATH_KEYS.values() if key in rates)]:
        result[f"ratio_{name}_vs_expert"] = round(rates[name] / rates["expert_map_in_arrow"], 3)
        result[f"ratio_{name}_vs_predict_batch_udf"] = round(
            rates[name] / rates["predict_batch_udf"], 3
        )
    result["ratio_deepspark_vs_single_process"] = round(
        rates["deepspark"] / rates["single_process"], 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, for CI and laptops")
    args = parser.parse_args()

    import deepspark as ds

    cases = [
        Case("mlp", make_mlp, (64,), 100_000 if args.quick else 1_000_000),
        Case("cnn", make_cnn, (1, 28, 28), 10_000 if args.quick else 100_000),
    ]
    results: dict[str, object] = {
        "benchmark": "predict",
        "quick": args.quick,
        "cores": CORES,
        "batch_size": BATCH_SIZE,
        "passthrough": PASSTHROUGH,
        "date": today(),
        "machine": machine(),
        "torch": torch.__version__,
        # Other processes on the machine slow every path; the figures are only as quiet as this.
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
    spark = ds.init_context(cores=CORES, driver_memory="4g", app_name="benchmark-predict")
    spark.sparkContext.setLogLevel("ERROR")
    results["spark"] = spark.version
    try:
        for seed, case in enumerate(cases):
            for key, value in run_case(spark, case, seed, 2 if args.quick else 3).items():
                results[f"{case.name}_{key}"] = value
    finally:
        ds.stop_context()
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    print()
    print_table(
        ["model", "path", "rows/s", "vs expert", "vs predict_batch_udf"],
        [
            [case.name, path, results.get(f"{case.name}_{path}_rows_per_s", "n/a"),
             results.get(f"{case.name}_ratio_{path}_vs_expert", ""),
             results.get(f"{case.name}_ratio_{path}_vs_predict_batch_udf", "")]
            for case in cases
            for path in _TABLE_PATHS
        ],
    )  # fmt: skip
    print(f"deepspark takes the {results['mlp_deepspark_path']} path by default here")
    emit_json(results)


_TABLE_PATHS = (
    "single_process",
    "deepspark_map_in_arrow",
    "deepspark_arrow_udf",
    "expert_map_in_arrow",
    "predict_batch_udf",
)


if __name__ == "__main__":
    run_logged("predict", main)
