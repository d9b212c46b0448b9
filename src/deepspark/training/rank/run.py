"""What one training rank does inside its Spark task. No pyspark here (DESIGN decision 12).

`run_rank` receives the task's Arrow batches and a function that all-gathers a string across
the ranks (Spark's `BarrierTaskContext.allGather` in production, anything equivalent in tests),
and yields the result rows rank 0 sends back to the driver.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from deepspark.training.job_spec import (
    RESULT_CHUNK_BYTES,
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    JobKind,
    ResultKind,
    TrainSpec,
)
from deepspark.training.rank.loop import EpochRunner, build_model

__all__ = ["RankContext", "cuda_device_index", "run_rank"]

_log = logging.getLogger(__name__)

AllGather = Callable[[str], list[str]]


@dataclass
class RankContext:
    """Where this rank runs: given by the Spark layer (or a test)."""

    rank: int
    all_gather: AllGather
    spill_dir: str
    task_cpus: int = 1
    gpu_ids: tuple[str, ...] = ()
    cleanup: list[str] = field(default_factory=list)  # files removed when the rank ends
    # wall-clock moments of this rank's task (time.time()), reported by rank 0 for the
    # driver's timeline of the fit; "task_start" is when the task function began
    marks: dict[str, float] = field(default_factory=lambda: {"task_start": time.time()})


def run_rank(
    spec: TrainSpec, batches: Iterable[pa.RecordBatch], context: RankContext
) -> Iterator[pa.RecordBatch]:
    """Train (or evaluate) as one rank of a data-parallel job; rank 0 yields the results."""
    from deepspark.data import PartitionSpill
    from deepspark.training.rank.progress_client import ProgressClient

    rank = context.rank
    progress = None
    if spec.progress_address is not None:
        progress = ProgressClient(spec.progress_address, spec.progress_token, rank, timeout_s=10)
    torch.set_num_threads(max(1, context.task_cpus))
    arriving = _marking_first(batches, context.marks)
    try:
        with PartitionSpill.write(arriving, context.spill_dir, split_column=SPLIT_COLUMN) as spill:
            context.marks["spill_done"] = time.time()
            yield from _run_with_spill(spec, spill, context, progress)
    except BaseException as error:
        if progress is not None and not isinstance(error, GeneratorExit):
            progress.send(
                {
                    "kind": "error",
                    "rank": rank,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            )
        # The traceback's frames hold the DDP model, and through it the process group and
        # rank 0's rendezvous store: clear them so the store's port closes now, not whenever
        # this (reused) Python worker happens to collect garbage.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        from deepspark.training.rank.rendezvous import destroy_process_group

        destroy_process_group()
        gc.collect()
        for path in context.cleanup:
            with contextlib.suppress(OSError):
                os.remove(path)
        if progress is not None:
            progress.close()


def _run_with_spill(spec, spill, context: RankContext, progress) -> Iterator[pa.RecordBatch]:
    from deepspark.data import plan_steps
    from deepspark.training.rank.rendezvous import (
        RendezvousSpec,
        free_port,
        init_process_group,
        local_ip,
    )

    rank = context.rank
    train_rows = spill.num_rows(TRAIN_SPLIT)
    val_rows = spill.num_rows(VALIDATION_SPLIT)
    host = spec.rendezvous_host or local_ip()
    port = free_port(host) if rank == 0 else 0
    # On one machine (local modes) the ranks meet in a file: no port is opened at all.
    store_path = None
    if rank == 0 and host.startswith("127."):
        store_path = os.path.join(context.spill_dir, f"deepspark-{spec.job_id}-{port}.store")
        context.cleanup.append(store_path)  # removed when the rank ends, however it ends
    hello = json.dumps(
        {
            "rank": rank,
            "host": host,
            "port": port,
            "store": store_path,
            "train": train_rows,
            "val": val_rows,
        }
    )
    peers = sorted((json.loads(message) for message in context.all_gather(hello)), key=_rank_of)
    if len(peers) != spec.world_size:
        raise RuntimeError(
            f"rank {rank}: expected {spec.world_size} ranks in the barrier stage, "
            f"found {len(peers)}"
        )
    master = peers[0]
    rows_per_rank = [peer["train"] for peer in peers]
    val_rows_per_rank = [peer["val"] for peer in peers]

    device = _device(spec, context)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if host.startswith("127.") and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_process_group(
        RendezvousSpec(
            master_addr=master["host"],
            master_port=int(master["port"]),
            world_size=spec.world_size,
            backend=backend,
            timeout_s=spec.collective_timeout_s,
            store_path=master.get("store"),
        ),
        rank,
    )
    context.marks["rendezvous_done"] = time.time()

    if rank == 0 and progress is not None and store_path is None:
        progress.send({"kind": "log", "text": "process group ready", "rendezvous_port": port})
    model = build_model(spec)
    model.to(device)
    runner = EpochRunner(spec, model, device, rank, progress)
    if spec.kind is JobKind.EVALUATE:
        metrics = runner.evaluate(spill, VALIDATION_SPLIT, val_rows_per_rank)
        if rank == 0:
            yield _result_batch(ResultKind.METRICS, json.dumps(metrics).encode())
        return

    plan = plan_steps(rows_per_rank, spec.batch_size, spec.step_policy)
    history = runner.fit(spill, plan, val_rows_per_rank if spec.has_validation else None)
    if rank == 0:
        if progress is not None:
            timeline = {**context.marks, **runner.marks}
            progress.send({"kind": "log", "text": "timeline", "timeline": timeline})
        yield _result_batch(ResultKind.HISTORY, json.dumps(history).encode())
        yield from _weights_batches(runner.model)


def _marking_first(
    batches: Iterable[pa.RecordBatch], marks: dict[str, float]
) -> Iterator[pa.RecordBatch]:
    """The task's batches, noting when the first one arrived (or the input ended empty)."""
    for batch in batches:
        marks.setdefault("first_batch", time.time())
        yield batch
    marks.setdefault("first_batch", time.time())


def _rank_of(peer: dict[str, Any]) -> int:
    return int(peer["rank"])


def _device(spec: TrainSpec, context: RankContext) -> torch.device:
    if not spec.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"rank {context.rank}: use_gpu=True but torch sees no CUDA device on this executor; "
            "install a CUDA build of torch there or train with use_gpu=False"
        )
    count = torch.cuda.device_count()
    if context.gpu_ids:
        try:
            index = cuda_device_index(
                context.gpu_ids[0], os.environ.get("CUDA_VISIBLE_DEVICES"), count
            )
        except ValueError as error:
            raise RuntimeError(f"rank {context.rank}: {error}") from None
    else:  # no GPU resource scheduling: spread the ranks of this machine over its devices
        index = context.rank % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cuda_device_index(address: str, visible_devices: str | None, device_count: int) -> int:
    """Torch's CUDA index for the GPU that Spark assigned to a task.

    Spark's addresses (``task.resources()["gpu"].addresses``, from the discovery script) name
    physical GPUs. When ``CUDA_VISIBLE_DEVICES`` is set, torch numbers only the GPUs listed
    there, in that order, so the index is the address's position in that list.

    Parameters
    ----------
    address : str
        The assigned GPU, as Spark gives it (``"3"``, or a UUID if discovery reports those).
    visible_devices : str or None
        The value of ``CUDA_VISIBLE_DEVICES``, or ``None`` when it is not set.
    device_count : int
        ``torch.cuda.device_count()``.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        When the assigned GPU is not among the devices this process can see.

    Examples
    --------
    >>> cuda_device_index("3", None, 8)
    3
    >>> cuda_device_index("3", "2,3", 2)
    1
    """
    address = str(address).strip()
    if visible_devices is None:
        if not address.isdigit():
            raise ValueError(
                f"Spark assigned GPU {address!r}, which is not a device index, and "
                "CUDA_VISIBLE_DEVICES is not set to say which device it is"
            )
        index = int(address)
    else:
        visible = [entry.strip() for entry in visible_devices.split(",") if entry.strip()]
        if address not in visible:
            raise ValueError(
                f"Spark assigned GPU {address!r}, but this process sees only "
                f"CUDA_VISIBLE_DEVICES={visible_devices!r}; make the GPU discovery script and "
                "CUDA_VISIBLE_DEVICES name the same devices (or unset CUDA_VISIBLE_DEVICES)"
            )
        index = visible.index(address)
    if not 0 <= index < device_count:
        raise ValueError(
            f"Spark assigned GPU {address!r} (torch index {index}), but torch sees "
            f"{device_count} CUDA device(s) here; check the executor's GPU discovery script"
        )
    return index


def _result_batch(kind: ResultKind, payload: bytes, seq: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"rank": [0], "kind": [kind.value], "seq": [seq], "payload": [payload]},
        schema=pa.schema(
            [
                ("rank", pa.int32()),
                ("kind", pa.string()),
                ("seq", pa.int32()),
                ("payload", pa.binary()),
            ]
        ),
    )


def _weights_batches(model: nn.Module) -> Iterator[pa.RecordBatch]:
    from deepspark.persist.weights import unwrap_model, weights_to_bytes

    blob = weights_to_bytes(unwrap_model(model).state_dict())
    for seq, start in enumerate(range(0, max(len(blob), 1), RESULT_CHUNK_BYTES)):
        yield _result_batch(ResultKind.WEIGHTS, blob[start : start + RESULT_CHUNK_BYTES], seq)
