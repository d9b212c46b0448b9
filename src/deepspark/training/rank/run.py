"""What one training rank does inside its Spark task. No pyspark here (DESIGN decision 12).

`run_rank` receives the task's Arrow batches and yields the result rows rank 0 sends back to
the driver. The ranks meet through the driver's progress channel (or, in tests without a
driver, a function that all-gathers a string across them); the input is read and spilled on a
background thread from the task's start, and the first epoch trains from it as it arrives
(`rank.first_epoch`).
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
    VALIDATION_SPLIT,
    JobKind,
    ResultKind,
    TrainSpec,
)
from deepspark.training.rank.allocator import keep_step_memory
from deepspark.training.rank.loop import EpochRunner, build_model
from deepspark.training.rank.rng_state import seed_generators
from deepspark.training.rank.sources import CreatorInput, RankInput

__all__ = ["RankContext", "cuda_device_index", "exchange_hellos", "run_rank"]

_log = logging.getLogger(__name__)

AllGather = Callable[[str], list[str]]


@dataclass
class RankContext:
    """Where this rank runs: given by the Spark layer (or a test)."""

    rank: int
    spill_dir: str
    # How the ranks meet: None (the Spark layer) goes through the driver's progress channel;
    # tests without a driver pass a function that all-gathers a string across the ranks.
    all_gather: AllGather | None = None
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
    from deepspark.training.rank.progress_client import ProgressClient

    rank = context.rank
    progress = None
    if spec.progress_address is not None:
        progress = ProgressClient(spec.progress_address, spec.progress_token, rank, timeout_s=10)
    torch.set_num_threads(max(1, context.task_cpus))
    keep_step_memory()  # the same allocator behaviour in every rank, whatever ran before
    # Python workers are reused across jobs: without this, whatever draws from the global
    # generators here (dropout, a shuffling sampler, the seeds a Keras model's layers take from
    # Python's random when it is built) would follow the worker's earlier jobs.
    seed_generators(spec.seed + rank)
    source = None
    failed = False
    try:
        source = _source(spec, batches, context)
        yield from _run(spec, source, context, progress)
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
        failed = True
        raise
    finally:
        from deepspark.training.rank.rendezvous import destroy_process_group

        if source is not None:
            source.close()
        destroy_process_group()
        if failed:  # what the cleared frames held goes now (a full collection: ~0.2 s)
            gc.collect()
        for path in context.cleanup:
            with contextlib.suppress(OSError):
                os.remove(path)
        if progress is not None:
            progress.close()


def _source(spec: TrainSpec, batches: Iterable[pa.RecordBatch], context: RankContext):
    """The rank's input: its partition's rows, or the batches of the user's data creator."""
    from deepspark.data import rows_from_chunks

    if spec.creator_blobs:
        import cloudpickle

        for _ in batches:  # the stage's one row per task says only which rank this is
            pass
        creators = {split: cloudpickle.loads(blob) for split, blob in spec.creator_blobs.items()}
        return CreatorInput(spec, context.rank, creators)
    needed = [name for tensor in (*spec.features, *spec.labels) for name in tensor.columns]
    rows = rows_from_chunks(batches, list(dict.fromkeys(needed)))
    if spec.kind is JobKind.FIT and not spec.allow_non_finite:
        from deepspark.data.finite import refuse_non_finite

        rows = refuse_non_finite(rows, needed, where=f"rank {context.rank}'s rows")
    return RankInput(spec, rows, context)


def _meet(spec: TrainSpec, context: RankContext, progress) -> list[dict[str, Any]]:
    """Every rank's address, port and store, in rank order: the rendezvous before torch's."""
    from deepspark.context.topology import local_ip
    from deepspark.training.rank.rendezvous import free_port

    rank = context.rank
    host = spec.rendezvous_host or local_ip()
    port = free_port(host) if rank == 0 else 0
    # On one machine (local modes) the ranks meet in a file: no port is opened at all.
    store_path = None
    if rank == 0 and host.startswith("127."):
        store_path = os.path.join(context.spill_dir, f"deepspark-{spec.job_id}-{port}.store")
        context.cleanup.append(store_path)  # removed when the rank ends, however it ends
    hello = {"rank": rank, "host": host, "port": port, "store": store_path}
    return exchange_hellos(spec, context, progress, hello)


def exchange_hellos(
    spec: TrainSpec, context: RankContext, progress, hello: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every rank's ``hello``, in rank order, through the driver's progress channel (or, in
    tests without a driver, the context's all-gather); within the job's collective timeout."""
    from deepspark.training.rank.rendezvous import RendezvousError

    rank = context.rank
    if context.all_gather is not None:
        gathered = (json.loads(message) for message in context.all_gather(json.dumps(hello)))
        peers = sorted(gathered, key=_rank_of)
    elif progress is not None:
        try:
            peers = progress.exchange(
                hello,
                attempt=spec.attempt,
                world_size=spec.world_size,
                timeout_s=spec.collective_timeout_s,
            )
        except (ConnectionError, TimeoutError) as error:
            address = "{}:{}".format(*progress.address)
            raise RendezvousError(
                f"rank {rank} of {spec.world_size} could not meet the other ranks through the "
                f"driver at {address}: {error}. Check that executors can reach the driver "
                "(spark.driver.host) and that the cluster has a free slot for every worker."
            ) from error
    else:
        raise RuntimeError("a rank needs the driver's progress channel or an all_gather to meet")
    if len(peers) != spec.world_size:
        raise RuntimeError(
            f"rank {rank}: expected {spec.world_size} ranks in the barrier stage, "
            f"found {len(peers)}"
        )
    return peers


def _run(spec: TrainSpec, source: RankInput, context: RankContext, progress):
    from deepspark.training.rank.rendezvous import RendezvousSpec, init_process_group

    rank = context.rank
    peers = _meet(spec, context, progress)
    context.marks["ranks_met"] = time.time()
    master = peers[0]
    device = _device(spec, context)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if str(master["host"]).startswith("127.") and backend == "gloo":
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

    if rank == 0 and progress is not None and master.get("store") is None:
        port = int(master["port"])
        progress.send({"kind": "log", "text": "process group ready", "rendezvous_port": port})
    model = build_model(spec)
    model.to(device)
    runner = EpochRunner(spec, model, device, rank, progress)
    if spec.kind is JobKind.EVALUATE:
        metrics = runner.evaluate(source, VALIDATION_SPLIT)
        if rank == 0:
            yield _result_batch(ResultKind.METRICS, json.dumps(metrics).encode())
        return

    history = runner.fit(source)
    if rank == 0:
        if progress is not None:
            timeline = {**context.marks, **source.marks, **runner.marks}
            progress.send({"kind": "log", "text": "timeline", "timeline": timeline})
        yield _result_batch(ResultKind.HISTORY, json.dumps(history).encode())
        if runner.step_history:
            payload = json.dumps(runner.step_history).encode()
            yield _result_batch(ResultKind.STEP_HISTORY, payload)
        yield from _weights_batches(runner.model)
        yield from _optimizer_batches(runner.steps)


def _rank_of(peer: dict[str, Any]) -> int:
    return int(peer["rank"])


def _device(spec: TrainSpec, context: RankContext) -> torch.device:
    if not spec.program.use_gpu:
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
    yield from _chunk_batches(ResultKind.WEIGHTS, blob)


def _optimizer_batches(steps: Any) -> Iterator[pa.RecordBatch]:
    """The optimizers' state (a `StepRunner`'s), for the estimator's next fit to continue."""
    from deepspark.persist.optimizer_state import optimizer_state_to_bytes

    state = None if steps is None else steps.optimizer_state
    if state is not None:
        blob = optimizer_state_to_bytes(state.state_dict())
        yield from _chunk_batches(ResultKind.OPTIMIZER, blob)


def _chunk_batches(kind: ResultKind, blob: bytes) -> Iterator[pa.RecordBatch]:
    for seq, start in enumerate(range(0, max(len(blob), 1), RESULT_CHUNK_BYTES)):
        yield _result_batch(kind, blob[start : start + RESULT_CHUNK_BYTES], seq)
