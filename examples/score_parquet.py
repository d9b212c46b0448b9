"""Score a Parquet table with a PyTorch model and write the predictions as Parquet.

With no arguments the example makes its own inputs: scikit-learn's handwritten digits
(8x8 images, 1,797 rows) as a Parquet table, and a small classifier trained on them in this
process and exported to ONNX (verified against torch). Then Spark does the real work: read the
table, run the model on every row where the data lives, write ``id``, ``label`` and the
predicted class with Spark's Parquet writer (exactly once, even if a task is retried).

Usage::

    python examples/score_parquet.py                       # the digits demo
    python examples/score_parquet.py --input data.parquet --model model.onnx \\
        --features pixels --output scored.parquet --passthrough id

``--model`` takes an ``.onnx`` file, a TorchScript file, a ``torch.export`` ``.pt2`` file or a
directory written by ``Estimator.save``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

import deepspark as ds
from deepspark.inference import export_onnx, predict


def make_demo_inputs(directory: str) -> tuple[str, str]:
    """The digits as Parquet (id, label, pixels), and an ONNX classifier trained on them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the demo needs scikit-learn (`pip install scikit-learn`), or pass --input")
    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    table = pa.table(
        {
            "id": np.arange(len(labels), dtype=np.int64),
            "label": labels,
            "pixels": pa.array(list(pixels), type=pa.list_(pa.float32())),
        }
    )
    table_path = os.path.join(directory, "digits.parquet")
    pq.write_table(table, table_path)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(pixels), torch.from_numpy(labels)
    for _ in range(150):  # a few seconds: full-batch training on 1,797 rows
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    onnx_path = os.path.join(directory, "digits.onnx")
    model_path = export_onnx(model, onnx_path, inputs[:8], input_names=["pixels"])
    return table_path, model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="Parquet table to score (default: the digits demo)")
    parser.add_argument("--model", help="model file or Estimator.save directory")
    parser.add_argument("--features", default="pixels", help="feature column (default: pixels)")
    parser.add_argument("--output", help="where to write the scored Parquet table")
    parser.add_argument(
        "--passthrough", nargs="*", help="columns kept beside the prediction (default: id, label)"
    )
    parser.add_argument(
        "--kind", default="class", choices=["auto", "double", "array", "class", "probabilities"]
    )
    args = parser.parse_args()
    if (args.input is None) != (args.model is None):
        parser.error("give --input and --model together, or neither for the demo")

    workdir = tempfile.mkdtemp(prefix="deepspark-score-")
    table_path, model_path = (args.input, args.model) if args.input else make_demo_inputs(workdir)
    output_path = args.output or os.path.join(workdir, "scored.parquet")
    passthrough = args.passthrough if args.passthrough is not None else ["id", "label"]

    spark = ds.init_context(cores=2, app_name="score-parquet")
    try:
        table = spark.read.parquet(table_path)
        passthrough = [name for name in passthrough if name in table.columns]
        scored = predict(
            table,
            model_path,
            feature_cols=args.features,
            output=args.kind,
            passthrough_cols=passthrough,
        )
        scored.write.mode("overwrite").parquet(output_path)

        written = spark.read.parquet(output_path)
        print(f"scored {written.count():,} rows of {table_path} -> {output_path}")
        written.show(5)
        if args.kind == "class" and "label" in passthrough:
            correct = written.filter("prediction = label").count()
            note = " (the demo scores the rows it was trained on)" if args.input is None else ""
            print(f"accuracy: {correct / written.count():.3f}{note}")
    finally:
        ds.stop_context()


if __name__ == "__main__":
    main()
