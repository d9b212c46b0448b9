"""Inference speed: deepspark's predict against the expert's best on this Spark, and PySpark's.

One run, same data, same 2 cores, three cases: an MLP on a 64-float array column and a small
CNN on 28x28 images, whose DataFrames carry passthrough columns of several types (id long,
name string, weight double, ts timestamp), and the independent check's case: a 4-layer MLP
over 300,000 rows of 64 floats with only ``id`` passed through. Every Spark path writes the
same columns (the passthrough columns and ``prediction``):

* single process: plain PyTorch on in-memory tensors, batches of 1024 rows, with 1 or 2
  intra-op threads, whichever is faster (no Spark, no Arrow, no serialisation);
* deepspark arrow_udf / mapInArrow: `deepspark.inference.predict` on each of its paths
  (``arrow_udf`` on Spark >= 4.1 is its default: only the feature column goes to Python);
* expert arrow_udf (Spark >= 4.1): a hand-written Arrow iterator UDF
  (``pyspark.sql.functions.arrow_udf``, "Arrow Python UDFs" in the PySpark user guide,
  https://spark.apache.org/docs/latest/api/python/tutorial/sql/arrow_pandas.html) that loads
  the model once per Python worker and returns only the prediction column, selected beside
  the passthrough columns, which stay in the JVM;
* expert mapInArrow: a hand-written ``DataFrame.mapInArrow`` (the only Arrow path on Spark
  3.5/4.0, which have no Arrow UDF), every column through Python. The expert's best is the
  faster of the two expert paths in the same run;
* predict_batch_udf: ``pyspark.ml.functions.predict_batch_udf`` as its documentation sets it
  up (a ``make_predict_fn`` that loads the model once, ``batch_size``,
  ``input_tensor_shapes``), https://spark.apache.org/docs/latest/api/python/reference/api/pyspark.ml.functions.predict_batch_udf.html.

Protocol (benchmarks/README.md): all Spark paths run in one ``local[2]`` session (2 tasks x 1
thread each), read the same cached DataFrame and write to Spark's ``noop`` sink, so the whole
pass runs and nothing is collected. Every path runs once to warm up (Python workers, model
loads), then the paths take turns over 3 rounds (``--rounds``); the median and the range are
reported.

Target (issue #27): deepspark >= 0.95x the expert's best on the same Spark. The last line
printed is one JSON object; every run is appended to benchmarks/log.jsonl.

Usage: python benchmarks/predict.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from _common import (
    emit_json,
    interleaved_rounds,
    machine,
    print_table,
    run_logged,
    speed_ratio,
    today,
    warm_up,
)

BATCH_SIZE = 1024
CORES = 2
ROUNDS = 3
PASSTHROUGH = ("id", "name", "weight", "ts")
PATH_CONF = "deepspark.predict.path"


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).eval()  # fmt: skip


def make_mlp4() -> torch.nn.Module:
    """The independent check's model: four linear layers, one score per row."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
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
    passthrough: tuple[str, ...] = PASSTHROUGH
    output: str = "array"  # "array": array<float> per row; "double": one score per row


def make_frame(spark, case: Case, seed: int):
    """A cached DataFrame (the case's passthrough columns and ``features``) and the features
    as a tensor."""
    rows, width = case.rows, int(np.prod(case.row_shape))
    generator = np.random.default_rng(seed)
    values = generator.standard_normal((rows, width), dtype=np.float32)
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    ids = np.arange(rows, dtype=np.int64)
    start = np.datetime64(datetime.datetime(2026, 1, 1), "us")
    columns = {
        "id": lambda: pa.array(ids),
        "name": lambda: pa.array([f"row-{i}" for i in range(rows)]),
        "weight": lambda: pa.array(generator.random(rows)),
        "ts": lambda: pa.array(start + ids.astype("timedelta64[s]"), pa.timestamp("us", tz="UTC")),
    }
    table = pa.table(
        {
            **{name: columns[name]() for name in case.passthrough},
            "features": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
        }
    )
    df = spark.createDataFrame(table).repartition(2 * CORES).cache()
    df.count()
    return df, torch.from_numpy(values.reshape(rows, *case.row_shape))


def write_noop(df) -> Callable[[], None]:
    return lambda: df.write.format("noop").mode("overwrite").save()


def single_process(
    model: torch.nn.Module, inputs: torch.Tensor, rounds: int = ROUNDS
) -> tuple[dict, int]:
    """The faster of 1 and CORES intra-op threads (on 2 small vCPUs one thread often wins),
    each warmed once and timed over the same rounds as the Spark paths."""
    results = []
    for threads in sorted({1, CORES}):

        def run(threads: int = threads) -> None:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for start in range(0, len(inputs), BATCH_SIZE):
                    model(inputs[start : start + BATCH_SIZE])

        warm_up({"single": run})
        results.append((interleaved_rounds({"single": run}, rounds)["single"], threads))
    torch.set_num_threads(CORES)
    stats, threads = min(results, key=lambda item: item[0]["median_s"])
    return stats, threads


def deepspark_scored(df, model: torch.nn.Module, case: Case, path: str | None):
    """``predict``'s DataFrame on ``path`` (None: the path it takes by default)."""
    from deepspark.inference import predict

    spark = df.sparkSession
    if path is None:
        spark.conf.unset(PATH_CONF)
    else:
        spark.conf.set(PATH_CONF, path)
    try:
        return predict(
            df, model, "features", batch_size=BATCH_SIZE, passthrough_cols=list(case.passthrough),
            feature_shapes={"features": case.row_shape}, output=case.output,
        )  # fmt: skip
    finally:
        spark.conf.unset(PATH_CONF)


def _score_arrays(net: torch.nn.Module, features: pa.Array, row_shape, output: str) -> pa.Array:
    """The model on one Arrow batch of ``array<float>`` rows, in ``BATCH_SIZE`` slices."""
    rows = len(features)
    flat = features.flatten().to_numpy(zero_copy_only=False)
    inputs = torch.from_numpy(flat).reshape(rows, *row_shape)
    with torch.inference_mode():
        outputs = torch.cat(
            [net(inputs[i : i + BATCH_SIZE]) for i in range(0, rows, BATCH_SIZE)]
        ).numpy()
    if output == "double":
        return pa.array(outputs.reshape(rows).astype(np.float64))
    width = outputs.shape[1]
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(outputs.reshape(-1)))


def _worker_model(model_bytes: bytes, key: str) -> torch.nn.Module:
    """The model, loaded once per Python worker (Spark reuses workers across tasks)."""
    torch.set_num_threads(1)  # one task, one core: as every Spark path runs
    models = _worker_models()
    if key not in models:
        models[key] = _load_state(model_bytes)
    return models[key]


def expert_arrow_udf_scored(df, model: torch.nn.Module, case: Case):
    """The expert's best on Spark >= 4.1: an Arrow iterator UDF returning only the prediction;
    the passthrough columns are selected beside it and never leave the JVM."""
    from pyspark.sql.functions import arrow_udf

    model_bytes = _state_of(model)
    key = f"{id(model)}-{len(model_bytes)}"
    row_shape, output = case.row_shape, case.output

    def score(arrays: Iterator[pa.Array]) -> Iterator[pa.Array]:
        net = _worker_model(model_bytes, key)
        for features in arrays:
            yield _score_arrays(net, features, row_shape, output)

    udf = arrow_udf(score, _spark_output_type(output))
    return df.select(*case.passthrough, udf("features").alias("prediction"))


def expert_map_in_arrow_scored(df, model: torch.nn.Module, case: Case):
    """A hand-written ``mapInArrow``: the model loaded once per Python worker; every column
    goes through Python (Spark 3.5/4.0's best, without Arrow UDFs)."""
    from pyspark.sql.types import StructField, StructType

    model_bytes = _state_of(model)
    key = f"{id(model)}-{len(model_bytes)}"
    row_shape, output, passthrough = case.row_shape, case.output, list(case.passthrough)

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        net = _worker_model(model_bytes, key)
        for batch in batches:
            prediction = _score_arrays(net, batch.column("features"), row_shape, output)
            columns = [batch.column(name) for name in passthrough]
            yield pa.RecordBatch.from_arrays([*columns, prediction], [*passthrough, "prediction"])

    fields = {field.name: field for field in df.schema.fields}
    schema = StructType(
        [*(fields[name] for name in passthrough),
         StructField("prediction", _spark_output_type(output), False)]
    )  # fmt: skip
    return df.select(*passthrough, "features").mapInArrow(score, schema)


def _spark_output_type(output: str):
    from pyspark.sql.types import ArrayType, DoubleType, FloatType

    return DoubleType() if output == "double" else ArrayType(FloatType(), False)


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


def predict_batch_udf_scored(df, model: torch.nn.Module, case: Case):
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, DoubleType, FloatType

    def make_predict_fn():
        torch.set_num_threads(1)  # one task, one core: as deepspark's tasks run

        def predict_fn(inputs: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                outputs = model(torch.from_numpy(inputs)).numpy()
            return outputs.reshape(-1).astype(np.float64) if case.output == "double" else outputs

        return predict_fn

    udf = predict_batch_udf(
        make_predict_fn,
        return_type=DoubleType() if case.output == "double" else ArrayType(FloatType()),
        batch_size=BATCH_SIZE,
        input_tensor_shapes=[list(case.row_shape)],
    )
    return df.select(*case.passthrough, udf("features").alias("prediction"))


def check_agreement(scored_frames: dict, model: torch.nn.Module, inputs, case: Case) -> None:
    """Every Spark path writes the same columns: the passthrough columns and the model's
    outputs."""
    with torch.inference_mode():
        expected = model(inputs)
    if case.output == "double":
        expected = expected.reshape(-1).double()
    columns = [*case.passthrough, "prediction"]
    reference = None
    for name, scored in scored_frames.items():
        assert scored.columns == columns, f"{name}: writes {scored.columns}, not {columns}"
        rows = scored.orderBy("id").limit(64).collect()
        ids = [row.id for row in rows]
        got = torch.tensor([row.prediction for row in rows], dtype=expected.dtype)
        torch.testing.assert_close(got, expected[ids], atol=1e-5, rtol=0, msg=name)
        passthrough = [tuple(row)[: len(case.passthrough)] for row in rows]
        assert reference is None or passthrough == reference, f"{name}: passthrough differs"
        reference = passthrough


def has_arrow_udf(spark) -> bool:
    """Arrow iterator UDFs (``pyspark.sql.functions.arrow_udf``) exist from Spark 4.1."""
    from pyspark.sql import functions

    major, minor = (int(part) for part in spark.version.split(".")[:2])
    return hasattr(functions, "arrow_udf") and (major, minor) >= (4, 1)


def run_case(spark, case: Case, seed: int, rounds: int = ROUNDS) -> dict[str, object]:
    model = case.make_model()
    df, inputs = make_frame(spark, case, seed)
    arrow_udf_here = has_arrow_udf(spark)
    scored = {"deepspark_map_in_arrow": deepspark_scored(df, model, case, "mapInArrow")}
    if arrow_udf_here:
        scored["deepspark_arrow_udf"] = deepspark_scored(df, model, case, "arrow_udf")
        scored["expert_arrow_udf"] = expert_arrow_udf_scored(df, model, case)
    scored["expert_map_in_arrow"] = expert_map_in_arrow_scored(df, model, case)
    scored["predict_batch_udf"] = predict_batch_udf_scored(df, model, case)
    check_agreement(scored, model, inputs, case)
    single, single_threads = single_process(model, inputs, rounds)
    runs = {name: write_noop(frame) for name, frame in scored.items()}
    cold = warm_up(runs)  # the first pass of each path: Python workers, model loads
    timed = interleaved_rounds(runs, rounds)
    timed["single_process"] = single
    df.unpersist()
    deepspark = "deepspark_arrow_udf" if arrow_udf_here else "deepspark_map_in_arrow"
    # The expert's best is whichever hand-written path ran faster here, not the one assumed to.
    experts = [name for name in ("expert_arrow_udf", "expert_map_in_arrow") if name in timed]
    expert = min(experts, key=lambda name: timed[name]["median_s"])
    result: dict[str, object] = {
        "rows": case.rows,
        "passthrough": list(case.passthrough),
        "output": case.output,
        "single_process_threads": single_threads,
        "deepspark_path": deepspark,
        "expert_best": expert,
        "first_pass_s": {name: round(value, 3) for name, value in cold.items()},
    }
    for name, stats in timed.items():
        result[name] = {**stats, "rows_per_s_median": round(case.rows / stats["median_s"])}
    for name in (deepspark, "deepspark_map_in_arrow"):
        for baseline in (expert, "expert_map_in_arrow", "predict_batch_udf", "single_process"):
            result[f"ratio_{name}_vs_{baseline}"] = speed_ratio(timed[name], timed[baseline])
    result["ratio_deepspark_vs_expert_best"] = result[f"ratio_{deepspark}_vs_{expert}"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, for CI and laptops")
    parser.add_argument("--cases", default="mlp,cnn,mlp4", help="comma-separated case names")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="interleaved timed rounds (at least 3)"
    )
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (benchmarks/README.md's protocol)")

    import deepspark as ds

    cases = [
        Case("mlp", make_mlp, (64,), 100_000 if args.quick else 1_000_000),
        Case("cnn", make_cnn, (1, 28, 28), 10_000 if args.quick else 100_000),
        Case("mlp4", make_mlp4, (64,), 60_000 if args.quick else 300_000, ("id",), "double"),
    ]
    chosen = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = sorted(set(chosen) - {case.name for case in cases})
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from mlp, cnn, mlp4")
    cases = [case for case in cases if case.name in chosen]
    results: dict[str, object] = {
        "benchmark": "predict",
        "quick": args.quick,
        "cores": CORES,
        "batch_size": BATCH_SIZE,
        "rounds": args.rounds,
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
            results[case.name] = run_case(spark, case, seed, args.rounds)
    finally:
        ds.stop_context()
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    results["targets"] = {
        f"{case.name}_ge_0_95x_expert_best": results[case.name]["ratio_deepspark_vs_expert_best"][
            "median"
        ]
        >= 0.95
        for case in cases
    }

    print()
    rows = []
    for case in cases:
        block = results[case.name]
        expert = block["expert_best"]
        for path in _TABLE_PATHS:
            if path not in block:
                continue
            ratio = speed_ratio(block[path], block[expert])
            rows.append(
                [case.name, path, block[path]["rows_per_s_median"], block[path]["spread"],
                 ratio["median"]]
            )  # fmt: skip
    print_table(["case", "path", "rows/s (median)", "spread max/min", "vs expert's best"], rows)
    emit_json(results)


_TABLE_PATHS = (
    "single_process",
    "deepspark_arrow_udf",
    "deepspark_map_in_arrow",
    "expert_arrow_udf",
    "expert_map_in_arrow",
    "predict_batch_udf",
)


if __name__ == "__main__":
    run_logged("predict", main)
