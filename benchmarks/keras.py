"""Keras on deepspark (issue #12): the torch backend against deepspark's own torch path.

One run, same 2 cores, same data and network (benchmarks/train.py's MLP: 64 -> 256 -> 256 ->
10, ReLU), same cached `features array<float>, label long` DataFrame in 2 partitions, same
global batch 256, Adam 1e-3, 2 workers:

* deepspark's torch path: `Estimator.from_torch` on the torch module;
* Keras 3 on the torch backend: `Estimator.from_keras` on the same architecture built from
  `keras.layers.Dense`, compiled with ``"adam"`` and ``"sparse_categorical_crossentropy"``.

The two paths run in turns (torch, Keras, torch, Keras, ...), each fit on warm workers after
one throw-away fit of each, so the machine's drift touches both alike. An epoch's time is the
history's ``seconds``; the ratio compares the medians of the epochs after the first of every
fit. Target: Keras-on-torch epoch <= 1.1x deepspark's torch epoch.

Usage: python benchmarks/keras.py [--quick]; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import pandas as pd
import torch
from _common import emit_json, machine, print_table, today
from train import CLASSES, FEATURES, HIDDEN, make_data
from train import make_model as make_torch_model

# This file's name is the library's: once the local helpers above are imported, take this
# folder off the path so that `import keras` finds Keras, not this script.
sys.path[:] = [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))
]

BATCH_SIZE, LEARNING_RATE, WORKERS = 256, 1e-3, 2


def make_keras_model():
    import keras

    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(HIDDEN, activation="relu"),
            keras.layers.Dense(HIDDEN, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )


def torch_estimator():
    import deepspark as ds

    torch.manual_seed(0)
    return ds.Estimator.from_torch(
        model=make_torch_model(),
        optimizer=lambda params: torch.optim.Adam(params, lr=LEARNING_RATE),
        loss=torch.nn.CrossEntropyLoss(),
    )


def keras_estimator():
    import keras

    import deepspark as ds

    return ds.Estimator.from_keras(
        make_keras_model(),
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        backend="torch",
    )


def later_epochs(history: pd.DataFrame) -> list[float]:
    return [float(seconds) for seconds in history["seconds"].iloc[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, epochs and rounds")
    args = parser.parse_args()
    rows, epochs, rounds = (40_000, 3, 2) if args.quick else (200_000, 4, 3)
    os.environ.setdefault("KERAS_BACKEND", "torch")  # this script's own process
    import deepspark as ds

    load_before = os.getloadavg()[0]
    spark = ds.init_context(cores=WORKERS)
    x, y = make_data(rows)
    frame = pd.DataFrame({"features": list(x), "label": y})
    df = spark.createDataFrame(frame).repartition(WORKERS)
    ds.cache(df)  # later fits on df read the converted chunks
    fit = {
        "feature_cols": "features",
        "label_cols": "label",
        "batch_size": BATCH_SIZE,
        "num_workers": WORKERS,
        "progress": False,
    }
    builders = {"torch": torch_estimator, "keras_torch": keras_estimator}
    for build in builders.values():  # warm-up: workers, imports, the cache
        build().fit(df.limit(4096), epochs=1, **fit)
    later: dict[str, list[float]] = {name: [] for name in builders}
    for number in range(rounds):
        for name, build in builders.items():
            history = build().fit(df, epochs=epochs, **fit)
            later[name].extend(later_epochs(history))
            print(f"round {number + 1} {name:12} epochs {history['seconds'].round(3).tolist()}")
    medians = {name: statistics.median(values) for name, values in later.items()}
    ratio = medians["keras_torch"] / medians["torch"]
    print_table(
        ["path", "median epoch s", "vs deepspark torch"],
        [
            [name, f"{value:.3f}", f"{value / medians['torch']:.2f}x"]
            for name, value in medians.items()
        ],
    )
    ds.stop_context()
    emit_json(
        {
            "benchmark": "keras",
            "quick": args.quick,
            "date": today(),
            "machine": machine(),
            "torch": torch.__version__,
            "keras": __import__("keras").__version__,
            "rows": rows,
            "epochs": epochs,
            "rounds": rounds,
            "batch_size": BATCH_SIZE,
            "workers": WORKERS,
            "torch_epoch_s": round(medians["torch"], 3),
            "keras_torch_epoch_s": round(medians["keras_torch"], 3),
            "ratio_keras_torch_vs_torch": round(ratio, 3),
            "targets": {"keras_torch_le_1_1x_torch": ratio <= 1.1},
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    main()
