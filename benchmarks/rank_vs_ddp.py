"""deepspark's rank loop against bare DDP, interleaved, without Spark (issue #14).

`benchmarks/epoch.py` measures its paths one after the other, so a VM whose speed drifts
between phases moves the ratios. Here the same two ranks' work runs in turns, bare DDP then
deepspark's `run_rank` then bare DDP again and so on, each pair of processes spawned afresh,
on the same conv net and data (2 ranks x 1 thread, gloo over a file store, global batch 256).
The ratio compares the medians of the epochs after the first, over all rounds.

Usage: python benchmarks/rank_vs_ddp.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import multiprocessing
import os
import statistics
import tempfile
import time

import cloudpickle
import numpy as np
import pyarrow as pa
import torch
from _common import emit_json, machine, run_logged, today
from epoch import make_cnn as epoch_cnn

WORLD, BATCH, EPOCHS, IMAGE = 2, 256, 3, 28 * 28


def make_cnn() -> torch.nn.Module:
    """`benchmarks/epoch.py`'s conv net, with the same weights in every process."""
    torch.manual_seed(0)
    return epoch_cnn()


def rank_data(rank: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(rank)
    return rng.standard_normal((rows, IMAGE), dtype=np.float32), rng.integers(0, 10, rows)


def file_all_gather(directory: str, rank: int):
    """What the driver's channel does inside Spark: every rank's message, in rank order."""
    rounds = [0]

    def gather(message: str) -> list[str]:
        name = os.path.join(directory, f"gather-{rounds[0]}-{{}}")
        rounds[0] += 1
        with open(name.format(rank) + ".part", "w") as handle:
            handle.write(message)
        os.replace(name.format(rank) + ".part", name.format(rank))
        deadline = time.monotonic() + 60
        paths = [name.format(other) for other in range(WORLD)]
        while not all(os.path.exists(path) for path in paths):
            if time.monotonic() > deadline:
                raise TimeoutError("a rank did not arrive")
            time.sleep(0.01)
        messages = []
        for path in paths:
            with open(path) as handle:
                messages.append(handle.read())
        return messages

    return gather


def deepspark_rank(rank: int, directory: str, rows: int, result: str) -> None:
    from deepspark.data import TensorSpec
    from deepspark.training.job_spec import JobKind
    from deepspark.training.rank.run import RankContext, run_rank

    x, y = rank_data(rank, rows)
    offsets = pa.array(np.arange(0, x.size + 1, IMAGE, dtype=np.int32))
    table = pa.table(
        {
            "features": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1))),
            "label": pa.array(y, pa.int64()),
            "__deepspark_split": pa.array(np.zeros(rows, np.int32)),
        }
    )
    program = {
        "model_blob": cloudpickle.dumps(make_cnn()),
        "loss_blob": cloudpickle.dumps(torch.nn.CrossEntropyLoss()),
        "optimizer_blob": cloudpickle.dumps(functools.partial(torch.optim.Adam, lr=1e-3)),
        "scheduler_blob": None,
        "metrics_blob": cloudpickle.dumps([]),
        "config": {},
    }
    job = {
        "kind": JobKind.FIT,
        "features": (TensorSpec("features", "array", (1, 28, 28)),),
        "labels": (TensorSpec("label", "scalar", (), dtype="int64"),),
        "world_size": WORLD,
        "batch_size": BATCH,
        "rendezvous_host": "127.0.0.1",
        "collective_timeout_s": 120.0,
        "job_id": "rank-vs-ddp",
        "callbacks_blob": None,
    }
    spec = _train_spec(program, job)
    context = RankContext(
        rank=rank, all_gather=file_all_gather(directory, rank), spill_dir=directory, task_cpus=1
    )
    output = list(run_rank(spec, iter(table.to_batches(max_chunksize=4096)), context))
    if rank == 0:
        results = pa.Table.from_batches(output)
        kinds = results.column("kind").to_pylist()
        history = json.loads(results.column("payload").to_pylist()[kinds.index("history")])
        with open(result, "w") as handle:
            json.dump([record["seconds"] for record in history], handle)


def _train_spec(program: dict, job: dict):
    """The rank's job description, for this checkout's engine: since the engine's public seam
    (issue #28) the program and loop travel as groups; before it, as flat fields. The same
    script then measures the commit before the refactor (`benchmarks/commits.py`)."""
    import dataclasses

    from deepspark.training.job_spec import TrainSpec

    names = {spec_field.name for spec_field in dataclasses.fields(TrainSpec)}
    if "program" not in names:
        return TrainSpec(**program, **job, epochs=EPOCHS)
    from deepspark.training.job_spec import RankProgram
    from deepspark.training.options import LoopOptions

    return TrainSpec(program=RankProgram(**program), loop=LoopOptions(epochs=EPOCHS), **job)


def expert_allocator() -> None:
    """What PyTorch's CPU tuning guide asks of a training process's allocator: reuse memory
    instead of mapping it afresh each step (its "Switch Memory allocator" section, jemalloc or
    TCMalloc). Here, glibc's own thresholds, fixed as deepspark's ranks fix them
    (`deepspark/training/rank/allocator.py`), so neither side gets what the other lacks."""
    import ctypes

    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt(-3, 64 * 1024 * 1024)  # M_MMAP_THRESHOLD
    mallopt(-1, 128 * 1024 * 1024)  # M_TRIM_THRESHOLD


def bare_rank(rank: int, directory: str, rows: int, result: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    expert_allocator()
    store = dist.FileStore(os.path.join(directory, "store"), WORLD)
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    x, y = rank_data(rank, rows)
    features, labels = torch.from_numpy(x.reshape(-1, 1, 28, 28)), torch.from_numpy(y)
    model = DistributedDataParallel(make_cnn())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    seconds = []
    for _ in range(EPOCHS):
        started = time.perf_counter()
        order = torch.randperm(rows)
        for start in range(0, rows, BATCH // WORLD):
            index = order[start : start + BATCH // WORLD]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(features[index]), labels[index]).backward()
            optimizer.step()
        total = torch.tensor([float(rows)])
        dist.all_reduce(total)  # the epoch's closing reduction, as the rank loop has
        seconds.append(time.perf_counter() - started)
    if rank == 0:
        with open(result, "w") as handle:
            json.dump(seconds, handle)
    dist.destroy_process_group()


def run_pair(target, rows: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as directory:
        result = os.path.join(directory, "result.json")
        processes = [
            context.Process(target=target, args=(rank, directory, rows, result))
            for rank in range(WORLD)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(600)
        with open(result) as handle:
            return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds of 3,072 rows a rank")
    args = parser.parse_args()
    rounds, rows = (2, 3072) if args.quick else (4, 6144)
    load_before = os.getloadavg()[0]
    later = {"bare_ddp": [], "deepspark": []}
    for number in range(rounds):
        for name, target in (("bare_ddp", bare_rank), ("deepspark", deepspark_rank)):
            seconds = run_pair(target, rows)
            later[name].extend(seconds[1:])
            print(f"round {number + 1} {name:10} epochs {[round(s, 3) for s in seconds]}")
    bare, ours = (statistics.median(later[name]) for name in ("bare_ddp", "deepspark"))
    emit_json(
        {
            "benchmark": "rank_vs_ddp",
            "quick": args.quick,
            "date": today(),
            "machine": machine(),
            "torch": torch.__version__,
            "rounds": rounds,
            "rows_per_rank": rows,
            "epochs": EPOCHS,
            "bare_ddp_epoch_s": round(bare, 3),
            "deepspark_rank_epoch_s": round(ours, 3),
            "ratio_deepspark_vs_bare_ddp": round(ours / bare, 3),
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    run_logged("rank_vs_ddp", main)
