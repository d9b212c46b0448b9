"""Where a predict task spends its time: deepspark's worker loop, part by part, beside an expert's.

No Spark here: one thread runs, on the Arrow batches a Spark task would receive (10,000 rows,
Spark's ``maxRecordsPerBatch``), deepspark's ``predict_partition`` and its parts (re-cutting
into model batches, Arrow to tensors, the model, the output column, the output batch), and the
loop of the expert ``mapInArrow`` function in ``benchmarks/predict.py``. What the model takes
and what the rest takes tells whether a Spark path can still gain: every path runs the same
model, so when the model is most of a task, no path can be much faster than another.

Usage: python benchmarks/predict_parts.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import torch
from _common import (
    emit_json,
    interleaved_rounds,
    machine,
    print_table,
    run_logged,
    today,
    warm_up,
)
from predict import BATCH_SIZE, make_cnn, make_mlp, make_mlp4

from deepspark.data import TensorSpec
from deepspark.data.columns import column_tensor, prepare_column
from deepspark.inference import OutputKind, PredictSpec, model_source, predict_partition
from deepspark.inference.worker import output_column, whole_batches

ARROW_BATCH_ROWS = 10_000


def arrow_batches(rows: int, row_shape: tuple[int, ...]) -> list[pa.RecordBatch]:
    width = int(np.prod(row_shape))
    values = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "features": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
        }
    )
    return table.to_batches(max_chunksize=ARROW_BATCH_ROWS)


def measure(
    name: str,
    model: torch.nn.Module,
    row_shape,
    rows: int,
    rounds: int,
    output: OutputKind = OutputKind.ARRAY,
) -> dict:
    batches = arrow_batches(rows, row_shape)
    feature = TensorSpec("features", "array", row_shape)
    spec = PredictSpec(
        model=model_source(model),
        features=(feature,),
        output_col="prediction",
        output=output,
        passthrough_cols=("id",),
        batch_size=BATCH_SIZE,
        num_threads=1,
    )
    torch.set_num_threads(1)
    whole = list(whole_batches(batches, BATCH_SIZE))

    def to_tensors() -> list[torch.Tensor]:
        """deepspark's conversion: each Arrow batch laid out and made a tensor once, then cut
        into model batches (views)."""
        tensors = []
        for batch in whole:
            tensor = column_tensor(prepare_column(batch, feature), feature)
            for start in range(0, batch.num_rows, BATCH_SIZE):
                tensors.append(tensor[start : start + BATCH_SIZE])
        return tensors

    inputs = to_tensors()
    slices_per_batch = [-(-batch.num_rows // BATCH_SIZE) for batch in whole]
    with torch.inference_mode():
        outputs = [model(tensor) for tensor in inputs]
    # as deepspark's loop: one output column per Arrow batch, from its model batches' outputs
    per_batch, start = [], 0
    for count in slices_per_batch:
        per_batch.append(torch.cat(outputs[start : start + count]))
        start += count

    def forward() -> None:
        with torch.inference_mode():
            for tensor in inputs:
                model(tensor)

    def output_columns() -> list[pa.Array]:
        return [output_column(out, output, len(out)) for out in per_batch]

    columns = output_columns()

    def assemble() -> None:
        for batch, column in zip(whole, columns, strict=True):
            pa.RecordBatch.from_arrays([batch.column("id"), column], names=["id", "prediction"])

    def expert() -> None:
        for batch in batches:
            count = batch.num_rows
            flat = batch.column("features").flatten().to_numpy(zero_copy_only=False)
            tensor = torch.from_numpy(flat).reshape(count, *row_shape)
            with torch.inference_mode():
                out = torch.cat(
                    [model(tensor[i : i + BATCH_SIZE]) for i in range(0, count, BATCH_SIZE)]
                )
            if output is OutputKind.DOUBLE:
                prediction = pa.array(out.numpy().reshape(count).astype(np.float64))
            else:
                width = out.shape[1]
                offsets = pa.array(np.arange(0, count * width + 1, width, dtype=np.int32))
                prediction = pa.ListArray.from_arrays(offsets, pa.array(out.numpy().reshape(-1)))
            pa.RecordBatch.from_arrays([batch.column("id"), prediction], ["id", "prediction"])

    runs = {
        "deepspark_loop": lambda: list(predict_partition(batches, spec)),
        "whole_batches": lambda: list(whole_batches(batches, BATCH_SIZE)),
        "to_tensors": to_tensors,
        "model": forward,
        "output_column": output_columns,
        "output_batch": assemble,
        "expert_loop": expert,
    }
    warm_up(runs)
    timed = interleaved_rounds(runs, rounds)
    seconds = {part: float(stats["median_s"]) for part, stats in timed.items()}
    spreads = {part: stats["spread"] for part, stats in timed.items()}
    result = {f"{name}_{part}_ms": round(value * 1000, 2) for part, value in seconds.items()}
    result[f"{name}_spread"] = spreads
    result[f"{name}_model_share_of_deepspark_loop"] = round(
        seconds["model"] / seconds["deepspark_loop"], 3
    )
    result[f"{name}_deepspark_loop_vs_expert_loop"] = round(
        seconds["expert_loop"] / seconds["deepspark_loop"], 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows")
    args = parser.parse_args()
    array, double = OutputKind.ARRAY, OutputKind.DOUBLE
    cases = [
        ("mlp", make_mlp(), (64,), 50_000, array),
        ("cnn", make_cnn(), (1, 28, 28), 10_000, array),
        ("mlp4", make_mlp4(), (64,), 150_000, double),  # predict.py's mlp4 case, one task's share
    ]
    results: dict[str, object] = {
        "benchmark": "predict_parts",
        "quick": args.quick,
        "threads": 1,
        "batch_size": BATCH_SIZE,
        "date": today(),
        "machine": machine(),
        "torch": torch.__version__,
    }
    for name, model, row_shape, rows, output in cases:
        rows = rows // 5 if args.quick else rows
        results[f"{name}_rows"] = rows
        rounds = 3 if args.quick else 5
        results.update(measure(name, model, row_shape, rows, rounds, output))
    parts = (
        "deepspark_loop",
        "whole_batches",
        "to_tensors",
        "model",
        "output_column",
        "output_batch",
    )
    print_table(
        ["model", *parts, "expert_loop"],
        [
            [name, *(results[f"{name}_{part}_ms"] for part in (*parts, "expert_loop"))]
            for name, *_ in cases
        ],
    )
    print("(milliseconds, one thread, median of the rounds)")
    emit_json(results)


if __name__ == "__main__":
    run_logged("predict_parts", main)
