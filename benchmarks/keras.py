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
fit. Target: Keras-on-torch epoch <= 1.1x deepspark's torch epoch. Alongside, without Spark,
the same network's step (forward, loss, backward) in one process, Keras against torch, at this
width and 4x wider: what Keras's layers themselves cost on the torch backend.

Then the TensorFlow backend against its limit: a bare two-process
`tf.distribute.MultiWorkerMirroredStrategy` program (no Spark) on the same rows held in memory,
each worker its half, per-replica batch 128, the same network, loss and Adam, a custom loop
(`strategy.run` with `GradientTape`; Keras 3's `fit` fails under this strategy), against
`Estimator.from_keras(..., backend="tensorflow")` on the cached DataFrame. In turns again;
throughput is rows per second of the median epoch after the first. Target: deepspark >= 0.9x
the bare program's throughput.

Usage: python benchmarks/keras.py [--quick]; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pandas as pd
import torch
from _common import emit_json, machine, print_table, run_logged, today
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


def step_ms(model, x, y, repeats: int = 200) -> float:
    """Milliseconds of one forward, loss and backward in this process (1 thread, no Spark)."""
    loss = torch.nn.CrossEntropyLoss()

    def step():
        model.zero_grad()
        loss(model(x), y).backward()

    for _ in range(20):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def framework_cost() -> dict[str, float]:
    """Keras's own cost on the torch backend: the same network's step in one process, Keras
    against torch, on a rank's share of the batch (128 rows), at two widths."""
    import keras

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = BATCH_SIZE // WORKERS
    x, y = torch.randn(rows, FEATURES), torch.randint(0, CLASSES, (rows,))
    found = {}
    for width in (HIDDEN, 4 * HIDDEN):
        torch.manual_seed(0)
        plain = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, CLASSES),
        )  # fmt: skip
        wrapped = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
        torch_ms, keras_ms = step_ms(plain, x, y), step_ms(wrapped, x, y)
        found[f"hidden_{width}_torch_step_ms"] = round(torch_ms, 3)
        found[f"hidden_{width}_keras_step_ms"] = round(keras_ms, 3)
        found[f"hidden_{width}_keras_vs_torch_step"] = round(keras_ms / torch_ms, 3)
    torch.set_num_threads(threads)
    return found


def tf_estimator():
    import keras

    import deepspark as ds

    return ds.Estimator.from_keras(
        make_keras_model(),
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        backend="tensorflow",
    )


def bare_worker(rank: int, ports: list[int], rows: int, epochs: int, result: str) -> None:
    """One worker of the bare MultiWorkerMirroredStrategy program (its own process)."""
    import json

    os.environ.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_ENABLE_ONEDNN_OPTS="0",
        TF_CONFIG=json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                "task": {"type": "worker", "index": rank},
            }
        ),
    )
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = make_data(rows)
    x, y = x[rank::WORKERS], y[rank::WORKERS]  # this worker's half, in memory
    local = BATCH_SIZE // WORKERS
    steps = len(y) // local

    def dataset_fn(context):
        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=rank)
        return data.repeat().batch(local, drop_remainder=True).prefetch(2)

    import keras

    with strategy.scope():
        model = make_keras_model()
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(features, training=True)) / BATCH_SIZE
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def train_step(iterator):
        losses = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for _ in range(steps):
            train_step(iterator)
        seconds.append(time.perf_counter() - started)
    if rank == 0:
        with open(result, "w") as handle:
            json.dump({"seconds": seconds, "rows": steps * BATCH_SIZE}, handle)


def run_bare(rows: int, epochs: int) -> tuple[list[float], int]:
    """The bare program's epoch times and rows per epoch: two fresh worker processes."""
    import json
    import socket
    import subprocess
    import tempfile

    ports = []
    for _ in range(WORKERS):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--bare-worker"]
        workers = [
            subprocess.Popen(
                [*command, str(rank), ",".join(map(str, ports)), str(rows), str(epochs), result],
                env={**os.environ, "KERAS_BACKEND": "tensorflow"},
            )
            for rank in range(WORKERS)
        ]
        for worker in workers:
            if worker.wait(timeout=900) != 0:
                raise RuntimeError("a bare MultiWorkerMirroredStrategy worker failed")
        with open(result) as handle:
            found = json.load(handle)
    return found["seconds"], found["rows"]


def later_epochs(history: pd.DataFrame) -> list[float]:
    return [float(seconds) for seconds in history["seconds"].iloc[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, epochs and rounds")
    parser.add_argument("--bare-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        rank, ports, rows, epochs, result = args.bare_worker
        bare_worker(int(rank), [int(p) for p in ports.split(",")], int(rows), int(epochs), result)
        return
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
    keras_cost = framework_cost()

    # the TensorFlow backend against a bare MultiWorkerMirroredStrategy program
    tf_estimator().fit(df.limit(4096), epochs=1, **fit)  # warm-up
    run_bare(4096, 1)
    tf_later: dict[str, list[float]] = {"bare_mwms": [], "keras_tf": []}
    tf_rows: dict[str, int] = {}
    for number in range(rounds):
        seconds, tf_rows["bare_mwms"] = run_bare(rows, epochs)
        tf_later["bare_mwms"].extend(seconds[1:])
        history = tf_estimator().fit(df, epochs=epochs, **fit)
        tf_rows["keras_tf"] = int(history["train_rows"].iloc[-1])
        tf_later["keras_tf"].extend(later_epochs(history))
        print(f"round {number + 1} bare MWMS epochs {[round(v, 3) for v in seconds]}")
        print(f"round {number + 1} keras_tf     epochs {history['seconds'].round(3).tolist()}")
    throughput = {
        name: tf_rows[name] / statistics.median(values) for name, values in tf_later.items()
    }
    tf_ratio = throughput["keras_tf"] / throughput["bare_mwms"]
    print(f"TensorFlow backend: {tf_ratio:.2f}x the bare program's rows/s")
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
            "single_process": keras_cost,
            "bare_mwms_rows_per_s": round(throughput["bare_mwms"]),
            "keras_tf_rows_per_s": round(throughput["keras_tf"]),
            "ratio_keras_tf_vs_bare_mwms": round(tf_ratio, 3),
            "targets": {
                "keras_torch_le_1_1x_torch": ratio <= 1.1,
                "keras_tf_ge_0_9x_bare_mwms": tf_ratio >= 0.9,
            },
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    run_logged("keras", main)
