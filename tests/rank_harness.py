"""Drive training ranks without Spark: spawned processes, pyarrow batches, a file all-gather.

Each rank is a spawned process that calls :func:`deepspark.training.rank.run.run_rank` with a
:class:`~deepspark.training.rank.run.RankContext` whose ``all_gather`` meets the other ranks
in a shared directory (inside Spark the ranks meet through the driver's progress channel).
Every rank runs two jobs in the same process, as a reused Spark Python worker would: a fit of
``epochs`` epochs that checkpoints, then a fit of one more epoch that resumes from it. A
:class:`~deepspark.training.driver.progress_server.ProgressServer` in this process receives
the ranks' progress. The data is a learnable toy problem made with numpy (three Gaussian classes).

This module imports neither pyspark nor scikit-learn, so it also runs on a GPU machine that
has only torch, pyarrow, pandas and numpy::

    PYTHONPATH=src python tests/rank_harness.py --device cuda --world-size 1

It prints one JSON line with the results; ``"ok": true`` when every check passed (exit code
0), else the failed checks under ``"failures"`` (exit code 1). ``tests/test_training_rank.py``
runs it on the CPU over gloo, and on CUDA over NCCL when ``DEEPSPARK_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import deepspark  # noqa: F401
except ImportError:  # run from a plain checkout: use its sources
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import pyarrow as pa
import torch

FEATURES = 8
CLASSES = 3
TRAIN_ROWS = 480
VALIDATION_ROWS = 120
ROWS_PER_BATCH = 64
WAIT_S = 300.0


def toy_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian classes in ``FEATURES`` dimensions, shuffled."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, size=(CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, size=TRAIN_ROWS + VALIDATION_ROWS)
    features = centers[labels] + rng.normal(0.0, 1.0, size=(len(labels), FEATURES))
    return features.astype(np.float32), labels.astype(np.int64)


def rank_batches(rank: int, world_size: int, seed: int = 0) -> list[pa.RecordBatch]:
    """This rank's partition: every ``world_size``-th row, train and validation rows tagged."""
    from deepspark.training.job_spec import SPLIT_COLUMN, TRAIN_SPLIT, VALIDATION_SPLIT

    features, labels = toy_data(seed)
    split = np.where(np.arange(len(labels)) < TRAIN_ROWS, TRAIN_SPLIT, VALIDATION_SPLIT)
    mine = np.arange(rank, len(labels), world_size)
    batches = []
    for start in range(0, len(mine), ROWS_PER_BATCH):
        rows = mine[start : start + ROWS_PER_BATCH]
        offsets = np.arange(0, len(rows) * FEATURES + 1, FEATURES, dtype=np.int32)
        x = pa.ListArray.from_arrays(pa.array(offsets), pa.array(features[rows].reshape(-1)))
        batches.append(
            pa.RecordBatch.from_arrays(
                [x, pa.array(labels[rows]), pa.array(split[rows].astype(np.int32))],
                ["x", "label", SPLIT_COLUMN],
            )
        )
    return batches


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES)
    )


def make_specs(device: str, world_size: int, epochs: int, workdir: str, progress) -> list[Any]:
    """The two jobs every rank runs: a fit that checkpoints, then one that resumes."""
    import dataclasses

    import cloudpickle

    from deepspark.data import TensorSpec
    from deepspark.training import JobKind, LoopOptions, RankProgram, RecoveryOptions
    from deepspark.training.job_spec import TrainSpec

    first = TrainSpec(
        kind=JobKind.FIT,
        program=RankProgram(
            model_blob=cloudpickle.dumps(make_model()),
            loss_blob=cloudpickle.dumps(torch.nn.CrossEntropyLoss()),
            optimizer_blob=cloudpickle.dumps(functools.partial(torch.optim.Adam, lr=0.01)),
            metrics_blob=cloudpickle.dumps(["accuracy"]),
            use_gpu=device == "cuda",
        ),
        features=(TensorSpec("x", "array", (FEATURES,)),),
        labels=(TensorSpec("label", "scalar", (), dtype="int64"),),
        world_size=world_size,
        batch_size=32,
        loop=LoopOptions(epochs=epochs),
        recovery=RecoveryOptions(checkpoint_dir=os.path.join(workdir, "checkpoints"), resume=True),
        has_validation=True,
        progress_address=progress.address,
        progress_token=progress.token,
        rendezvous_host="127.0.0.1",
        collective_timeout_s=120.0,
        job_id="harness-fit",
    )
    resumed = dataclasses.replace(
        first, loop=LoopOptions(epochs=epochs + 1), job_id="harness-resume"
    )
    return [first, resumed]


class FileAllGather:
    """``all_gather`` over a shared directory: each call is one round, like a barrier."""

    def __init__(self, directory: str, rank: int, world_size: int, timeout_s: float) -> None:
        self.directory, self.rank, self.world_size = directory, rank, world_size
        self.timeout_s = timeout_s
        self.round = 0

    def __call__(self, message: str) -> list[str]:
        name = f"round-{self.round:04d}-rank-{{}}.json"
        self.round += 1
        mine = os.path.join(self.directory, name.format(self.rank))
        with open(mine + ".partial", "w") as file:
            file.write(message)
        os.replace(mine + ".partial", mine)
        paths = [os.path.join(self.directory, name.format(rank)) for rank in range(self.world_size)]
        deadline = time.monotonic() + self.timeout_s
        while not all(os.path.exists(path) for path in paths):
            if time.monotonic() > deadline:
                raise TimeoutError(f"all_gather: not every rank arrived in {self.timeout_s} s")
            time.sleep(0.01)
        messages = []
        for path in paths:
            with open(path) as file:
                messages.append(file.read())
        return messages


def _visible_gpu(rank: int) -> str:
    """The GPU address Spark would assign: a physical id, as CUDA_VISIBLE_DEVICES lists it."""
    visible = [entry for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry]
    return visible[rank] if visible else str(rank)


def _rank_main(rank: int, world_size: int, device: str, workdir: str, specs: list[Any]) -> None:
    """One rank: both jobs in this process, results and status written to ``workdir``."""
    status: dict[str, Any] = {"rank": rank, "ok": False}
    try:
        from deepspark.training.rank.run import RankContext, run_rank

        gather_dir = os.path.join(workdir, "gather")
        all_gather = FileAllGather(gather_dir, rank, world_size, timeout_s=WAIT_S / 2)
        spill_dir = os.path.join(workdir, f"spill-{rank}")
        os.makedirs(spill_dir, exist_ok=True)
        for number, spec in enumerate(specs):
            context = RankContext(
                rank=rank,
                all_gather=all_gather,
                spill_dir=spill_dir,
                task_cpus=1,
                gpu_ids=(_visible_gpu(rank),) if device == "cuda" else (),
            )
            output = list(run_rank(spec, iter(rank_batches(rank, world_size)), context))
            if output:
                table = pa.Table.from_batches(output)
                path = os.path.join(workdir, f"result-{number}-{rank}.arrow")
                with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
        status["ok"] = True
        status["cuda_device"] = torch.cuda.current_device() if device == "cuda" else None
    except BaseException as error:  # reported to the parent, which fails with it
        status["error"] = f"{type(error).__name__}: {error}"
        status["traceback"] = traceback.format_exc()[-4000:]
    with open(os.path.join(workdir, f"status-{rank}.json"), "w") as file:
        json.dump(status, file)


def _read_result(path: str) -> dict[str, bytes]:
    from deepspark.training.job_spec import ResultKind

    table = pa.ipc.open_file(path).read_all()
    chunks: dict[str, list[tuple[int, bytes]]] = {kind.value: [] for kind in ResultKind}
    for kind, seq, payload in zip(
        table.column("kind").to_pylist(),
        table.column("seq").to_pylist(),
        table.column("payload").to_pylist(),
        strict=True,
    ):
        chunks[kind].append((seq, payload))
    return {kind: b"".join(p for _, p in sorted(parts)) for kind, parts in chunks.items() if parts}


def _validation_scores(weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Loss and accuracy of the returned weights on every validation row, in this process."""
    model = make_model()
    model.load_state_dict(weights)
    features, labels = toy_data()
    x = torch.from_numpy(features[TRAIN_ROWS:])
    y = torch.from_numpy(labels[TRAIN_ROWS:])
    with torch.no_grad():
        outputs = model(x)
        loss = float(torch.nn.functional.cross_entropy(outputs, y))
        accuracy = float((outputs.argmax(1) == y).double().mean())
    return loss, accuracy


def run_harness(device: str = "cpu", world_size: int = 2, epochs: int = 4) -> dict[str, Any]:
    """Run the ranks, check what came back, and return the findings (see the module doc)."""
    from deepspark.training.driver.progress_server import ProgressServer

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device here")
    report: dict[str, Any] = {"device": device, "world_size": world_size, "epochs": epochs}
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="deepspark-rank-harness-") as workdir,
        ProgressServer(host="127.0.0.1", max_connections=world_size) as progress,
    ):
        os.makedirs(os.path.join(workdir, "gather"))
        specs = make_specs(device, world_size, epochs, workdir, progress)
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=_rank_main, args=(rank, world_size, device, workdir, specs))
            for rank in range(world_size)
        ]
        started = time.perf_counter()
        for process in processes:
            process.start()
        deadline = time.monotonic() + WAIT_S
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
                failures.append(f"a rank did not finish within {WAIT_S:g} s")
        report["seconds"] = round(time.perf_counter() - started, 2)
        for rank in range(world_size):
            status_path = os.path.join(workdir, f"status-{rank}.json")
            if not os.path.exists(status_path):
                failures.append(
                    f"rank {rank} wrote no status (exit code {processes[rank].exitcode})"
                )
                continue
            with open(status_path) as file:
                status = json.load(file)
            if not status["ok"]:
                failures.append(f"rank {rank}: {status['error']}\n{status['traceback']}")
            elif device == "cuda":
                report.setdefault("cuda_devices", []).append(status["cuda_device"])
        report["progress_steps"] = len(progress.events("step"))
        report["progress_rejected"] = progress.rejected
        report["progress_refused"] = progress.refused
        report["leftover_files"] = sorted(  # spills and rendezvous store files go with a job
            name
            for rank in range(world_size)
            if os.path.isdir(os.path.join(workdir, f"spill-{rank}"))
            for name in os.listdir(os.path.join(workdir, f"spill-{rank}"))
        )
        if not failures:
            _check_results(workdir, world_size, epochs, report, failures)
        if report["progress_steps"] == 0:
            failures.append("the driver's progress server received no step event")
        if progress.rejected or progress.refused:
            failures.append("the progress server rejected or refused the ranks' connections")
        if report["leftover_files"]:
            failures.append(f"files left in the spill directories: {report['leftover_files']}")
    report["failures"] = failures
    report["ok"] = not failures
    return report


def _check_results(workdir, world_size, epochs, report, failures) -> None:
    from deepspark.persist.weights import weights_from_bytes
    from deepspark.training.job_spec import ResultKind

    extra = [name for name in os.listdir(workdir) if name.startswith("result-")]
    if sorted(extra) != ["result-0-0.arrow", "result-1-0.arrow"]:
        failures.append(f"results should come from rank 0 alone, once per job; found {extra}")
        return
    first = _read_result(os.path.join(workdir, "result-0-0.arrow"))
    resumed = _read_result(os.path.join(workdir, "result-1-0.arrow"))
    history = json.loads(first[ResultKind.HISTORY.value])
    history_resumed = json.loads(resumed[ResultKind.HISTORY.value])
    losses = [record["train_loss"] for record in history]
    report["train_loss"] = [round(loss, 4) for loss in losses]
    report["val_loss"] = history[-1]["val_loss"]
    report["val_accuracy"] = history[-1].get("val_accuracy")
    report["train_rows"] = history[-1]["train_rows"]
    if len(history) != epochs or not all(math.isfinite(loss) for loss in losses):
        failures.append(f"history of {len(history)} epochs with losses {losses}")
        return
    if not losses[-1] < 0.5 * losses[0]:
        failures.append(f"the training loss did not fall: {losses}")
    if history[-1]["train_rows"] != TRAIN_ROWS:
        failures.append(f"train_rows={history[-1]['train_rows']}, expected {TRAIN_ROWS}")
    # The weights rank 0 sent back score, here, what the ranks measured with them.
    loss, accuracy = _validation_scores(weights_from_bytes(first[ResultKind.WEIGHTS.value]))
    report["returned_weights_val_loss"] = loss
    report["returned_weights_val_accuracy"] = accuracy
    if not math.isclose(loss, history[-1]["val_loss"], rel_tol=1e-4, abs_tol=1e-5):
        failures.append(f"returned weights give val loss {loss}, the ranks {history[-1]}")
    if accuracy < 0.9:
        failures.append(f"returned weights reach only {accuracy:.3f} validation accuracy")
    val_accuracy = history[-1].get("val_accuracy")
    if val_accuracy is None or not math.isclose(accuracy, val_accuracy, abs_tol=1e-6):
        failures.append(f"val_accuracy {val_accuracy} differs from the weights' {accuracy}")
    # The second job resumed from the first one's last checkpoint: one more epoch only.
    report["resumed_epochs"] = [record["epoch"] for record in history_resumed]
    if [record["epoch"] for record in history_resumed] != list(range(epochs + 1)):
        failures.append(f"the resumed job's history has epochs {report['resumed_epochs']}")
    elif history_resumed[:epochs] != history:
        failures.append("the resumed job did not keep the checkpointed history")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world-size", type=int, default=None, help="default: 1 on cuda, else 2")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    world_size = args.world_size or (1 if args.device == "cuda" else 2)
    report = run_harness(args.device, world_size, args.epochs)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
