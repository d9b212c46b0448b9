"""Training speed: deepspark against PySpark's TorchDistributor, and single-process PyTorch.

Same data, same 2 cores, the same MLP, optimizer, batch and epochs on every path:

* single process: plain PyTorch on in-memory tensors, the faster of 1 and 2 threads (the
  machine's limit for the epoch);
* deepspark: `Estimator.fit` with 2 workers x 1 thread inside Spark;
* TorchDistributor: as PySpark's documentation sets it up ("Distributed training with
  TorchDistributor", https://spark.apache.org/docs/latest/api/python/reference/api/pyspark.ml.torch.distributor.TorchDistributor.html):
  the DataFrame written to Parquet, then read and trained by 2 processes with DDP over gloo,
  the write counted.

Protocol (benchmarks/README.md): the training data sits in Parquet and every timed fit reads
it through a plan; each round gives both paths a DataFrame the session has not seen before
(``unseen``), and a second set of rounds gives both the same DataFrame object again
(``repeated``). Warm: both paths first run the same warm-up (one epoch on 2,048 rows), then
the rounds interleave. Cold: each fit is the first of a new SparkContext (new Python workers,
the driver's JVM kept), rounds interleaved too. Fixed cost is end to end minus the epochs,
both paths timing their epochs the same way (inside the training loop).

Targets: deepspark end to end <= 0.7x TorchDistributor's, warm and cold; epoch <= 1.15x the
single process. The last line printed is one JSON object; every run is appended to
benchmarks/log.jsonl.

Usage: python benchmarks/train.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from _common import (
    emit_json,
    interleaved_rounds,
    machine,
    run_logged,
    speed_ratio,
    summarise,
    today,
    warm_up,
)

FEATURES, CLASSES, HIDDEN = 64, 10, 256
WARM_UP_ROWS = 2048
CASES = ("warm_unseen", "warm_repeated", "cold_unseen")


def make_data(rows: int, seed: int = 0):
    """A learnable problem: labels from a fixed random teacher network."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    y = np.argmax(np.tanh(x) @ teacher, axis=1).astype(np.int64)
    return x, y


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def single_process(x, y, test_x, test_y, epochs: int, batch: int, lr: float, threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    features, labels = torch.from_numpy(x), torch.from_numpy(y)
    epoch_times = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            loss_fn(model(features[index]), labels[index]).backward()
            optimizer.step()
        epoch_times.append(time.perf_counter() - started)
    return epoch_times, accuracy(model, test_x, test_y)


def deepspark_run(df, test_x, test_y, epochs: int, batch: int, lr: float) -> dict:
    import deepspark as ds

    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=make_model(),
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        loss=torch.nn.CrossEntropyLoss(),
    )
    started = time.perf_counter()
    est.fit(
        df,
        feature_cols="features",
        label_cols="label",
        epochs=epochs,
        batch_size=batch,
        num_workers=2,
        seed=0,
        progress=False,
    )
    end_to_end = time.perf_counter() - started
    return {
        "end_to_end_s": end_to_end,
        "epochs_s": est.timings_["epochs"],
        "first_step_s": est.first_step_s_,
        "accuracy": accuracy(est.get_model(), test_x, test_y),
    }


def _torchdistributor_train(path, epochs, batch, lr, out):
    """The function TorchDistributor runs on each of its processes (DDP over gloo)."""
    import os
    import time

    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # Each rank reads the whole Parquet folder and keeps its contiguous share of the rows
    # (a small warm-up frame may be a single file, fewer files than ranks).
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
    table = pq.read_table([os.path.join(path, f) for f in files])
    share = table.num_rows // world
    table = table.slice(rank * share, share)
    flat = table.column("features").combine_chunks().flatten().to_numpy()
    x = torch.from_numpy(flat.reshape(-1, 64).copy()).float()
    y = torch.from_numpy(table.column("label").to_numpy()).long()
    torch.manual_seed(0)
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    local = batch // world
    steps = torch.tensor([len(y) // local])
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for step in range(int(steps)):
            index = order[step * local : (step + 1) * local]
            optimizer.zero_grad()
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
    epochs_s = time.perf_counter() - started
    if rank == 0:
        torch.save(model.module.state_dict(), out)
        with open(out + ".json", "w") as handle:
            handle.write(json.dumps({"epochs_s": epochs_s}))
    dist.destroy_process_group()


def torchdistributor_run(df, test_x, test_y, epochs: int, batch: int, lr: float) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    workdir = tempfile.mkdtemp(prefix="bench-td-")
    started = time.perf_counter()
    parquet = os.path.join(workdir, "train.parquet")
    df.write.parquet(parquet)
    weights = os.path.join(workdir, "weights.pt")
    TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
        _torchdistributor_train, parquet, epochs, batch, lr, weights
    )
    end_to_end = time.perf_counter() - started
    model = make_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    with open(weights + ".json") as handle:
        epochs_s = json.load(handle)["epochs_s"]
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "end_to_end_s": end_to_end,
        "epochs_s": epochs_s,
        "accuracy": accuracy(model, test_x, test_y),
    }


PATHS = {"deepspark": deepspark_run, "torchdistributor": torchdistributor_run}


class Fits:
    """Each path's timed fits: the callables the rounds time, and what each fit reported."""

    def __init__(self, frames, test, epochs: int, batch: int, lr: float) -> None:
        self.frames, self.test, self.args = frames, test, (epochs, batch, lr)
        self.reports: dict[str, list[dict]] = {name: [] for name in PATHS}

    def runs(self) -> dict:
        def run(name: str):
            report = PATHS[name](self.frames(), *self.test, *self.args)
            self.reports[name].append(report)

        return {name: (lambda name=name: run(name)) for name in PATHS}

    def figures(self, timed: dict) -> dict:
        out: dict[str, object] = {}
        for name, reports in self.reports.items():
            fixed = [r["end_to_end_s"] - r["epochs_s"] for r in reports]
            out[name] = {
                "end_to_end": timed[name],
                "fixed_cost": summarise(fixed),
                "epochs_s_median": round(float(np.median([r["epochs_s"] for r in reports])), 3),
                "accuracy_median": round(float(np.median([r["accuracy"] for r in reports])), 4),
            }
        ds, td = timed["deepspark"], timed["torchdistributor"]
        out["ratio_deepspark_time_vs_torchdistributor"] = {
            key: round(1 / value, 3) for key, value in speed_ratio(ds, td).items()
        }
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, for CI and laptops")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}"
    )
    args = parser.parse_args()
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    if not cases or set(cases) - set(CASES):
        parser.error(f"--cases={args.cases!r}: choose from {', '.join(CASES)}")
    rows = 40_000 if args.quick else 400_000
    epochs = 2 if args.quick else 3
    rounds = 3
    batch, lr = 256, 1e-3
    load_before = os.getloadavg()[0]

    import pandas as pd
    from pyspark.sql import functions as F

    import deepspark as ds

    x, y = make_data(rows + rows // 5)
    train_x, train_y, test_x, test_y = x[:rows], y[:rows], x[rows:], y[rows:]
    test = (test_x, test_y)

    # The epoch baseline is the faster of 1 and 2 threads: on small shared VMs two intra-op
    # threads are often slower than one, and a weak baseline would flatter deepspark.
    singles = {
        threads: single_process(train_x, train_y, test_x, test_y, epochs, batch, lr, threads)
        for threads in (2, 1)
    }
    single_threads = min(singles, key=lambda threads: float(np.median(singles[threads][0])))
    single_times, single_acc = singles[single_threads]

    source = tempfile.mkdtemp(prefix="bench-train-")
    parquet = os.path.join(source, "train.parquet")
    spark = ds.init_context(cores=2, app_name="bench-train")
    pdf = pd.DataFrame({"features": list(train_x), "label": train_y})
    spark.createDataFrame(pdf, "features array<float>, label long").repartition(2).write.parquet(
        parquet
    )
    fresh_index = itertools.count()

    def unseen():
        """A plan this session has not run: the same rows behind a filter it has not seen."""
        floor = -1 - next(fresh_index)
        return ds_session().read.parquet(parquet).where(F.col("label") > F.lit(floor))

    def ds_session():
        from pyspark.sql import SparkSession

        return SparkSession.getActiveSession()

    figures: dict[str, object] = {}
    first_steps: list[float] = []
    # Warm: the same warm-up for both paths, then interleaved rounds.
    warm_frame = unseen().limit(WARM_UP_ROWS)
    warm_up({name: (lambda f=f: f(warm_frame, *test, 1, batch, lr)) for name, f in PATHS.items()})
    if "warm_unseen" in cases:
        fits = Fits(unseen, test, epochs, batch, lr)
        figures["warm_unseen"] = fits.figures(interleaved_rounds(fits.runs(), rounds))
        first_steps += [r["first_step_s"] for r in fits.reports["deepspark"]]
    if "warm_repeated" in cases:
        repeated_frame = unseen()
        fits = Fits(lambda: repeated_frame, test, epochs, batch, lr)
        warm_up(fits.runs())  # both paths see the frame once; the rounds then repeat it
        figures["warm_repeated"] = fits.figures(interleaved_rounds(fits.runs(), rounds))
        first_steps += [r["first_step_s"] for r in fits.reports["deepspark"]]

    # Cold: every fit the first of a new SparkContext (new Python workers).
    def cold_runs() -> dict:
        def cold(name: str):
            ds.stop_context()
            ds.init_context(cores=2, app_name="bench-train-cold")
            cold_fits.reports[name].append(PATHS[name](unseen(), *test, epochs, batch, lr))

        return {name: (lambda name=name: cold(name)) for name in PATHS}

    cold_fits = Fits(unseen, test, epochs, batch, lr)
    if "cold_unseen" in cases:
        figures["cold_unseen"] = cold_fits.figures(interleaved_rounds(cold_runs(), rounds))
    ds.stop_context()
    shutil.rmtree(source, ignore_errors=True)

    single_epoch = float(np.median(single_times))
    ds_epoch = next(iter(figures.values()))["deepspark"]["epochs_s_median"] / epochs
    result = {
        "benchmark": "train",
        "quick": args.quick,
        "date": today(),
        "machine": machine(),
        "rows": rows,
        "epochs": epochs,
        "batch_size": batch,
        "rounds": rounds,
        "single_process_epoch_s": round(single_epoch, 3),
        "single_process_threads": single_threads,
        "single_process_accuracy": round(single_acc, 4),
        "deepspark_epoch_s": round(ds_epoch, 3),
        "ratio_epoch_vs_single_process": round(ds_epoch / single_epoch, 3),
        "time_to_first_step_s": round(float(np.median(first_steps)), 3) if first_steps else None,
        **figures,
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    result["targets"] = {
        f"{case}_end_to_end_le_0_7x_torchdistributor": figures[case][
            "ratio_deepspark_time_vs_torchdistributor"
        ]["median"]
        <= 0.7
        for case in figures
    }
    print(f"{'':34}{'deepspark s':>12}{'TorchDistributor s':>20}{'ratio':>8}")
    for case in figures:
        block = figures[case]
        print(
            f"{case + ' end to end (median)':34}"
            f"{block['deepspark']['end_to_end']['median_s']:>12.2f}"
            f"{block['torchdistributor']['end_to_end']['median_s']:>20.2f}"
            f"{block['ratio_deepspark_time_vs_torchdistributor']['median']:>8.3f}"
        )
        print(
            f"{case + ' fixed cost (median)':34}"
            f"{block['deepspark']['fixed_cost']['median_s']:>12.2f}"
            f"{block['torchdistributor']['fixed_cost']['median_s']:>20.2f}"
        )
    print(f"epoch: deepspark {ds_epoch:.2f} s, single process {single_epoch:.2f} s")
    emit_json(result)


if __name__ == "__main__":
    run_logged("train", main)
