"""What one rank of a `deepspark.run` job does inside its Spark task (no pyspark here).

The rank meets the others through the driver's progress channel (the same hello exchange as a
fit), sets the environment ``torchrun`` gives (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), and then either joins the process group
and calls the user's function, or starts the user's script as a child process (which joins
the group itself, as under ``torchrun``). Its output goes to the driver line by line; rank 0
sends the function's return value back; a failure reaches the driver with its traceback.
The input rows (the DataFrames given to the run) are spilled on a background thread from
the task's start, for `deepspark.shard`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from deepspark.training.job_spec import RESULT_CHUNK_BYTES, SPLIT_COLUMN, ResultKind
from deepspark.training.rank._output_relay import OutputRelay, captured_output
from deepspark.training.rank.allocator import child_environment, keep_step_memory
from deepspark.training.rank.function_state import ActiveRun, running
from deepspark.training.rank.run import RankContext, cuda_device_index, exchange_hellos
from deepspark.training.run_spec import RunSpec

__all__ = ["run_function_rank", "torchrun_environment"]

# The variables a rank sets for the user's code, and restores afterwards (Spark reuses its
# Python workers across tasks).
_ENV_NAMES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "CUDA_VISIBLE_DEVICES",
    "GLOO_SOCKET_IFNAME",
    "OMP_NUM_THREADS",
)


def run_function_rank(
    spec: RunSpec, batches: Iterable[pa.RecordBatch], context: RankContext
) -> Iterator[pa.RecordBatch]:
    """Run the user's function (or script) as rank ``context.rank``; rank 0 yields its result."""
    from deepspark.training.rank.progress_client import ProgressClient

    progress = None
    if spec.progress_address is not None:
        progress = ProgressClient(
            spec.progress_address, spec.progress_token, context.rank, timeout_s=10
        )
    relay = OutputRelay(progress, max_lines=spec.max_log_lines, max_chars=spec.max_line_chars)
    stream = _input(spec, batches, context)
    saved_env = {name: os.environ.get(name) for name in (*_ENV_NAMES, *spec.env)}
    failed = False
    try:
        peers = _meet(spec, context, progress)
        environment = torchrun_environment(peers, context.rank, use_gpu=spec.use_gpu)
        os.environ.update({**spec.env, **environment})
        if spec.script is not None:
            _run_script(spec, context, relay, environment)
            result = None
        else:
            visible_before = saved_env["CUDA_VISIBLE_DEVICES"]
            result = _call_function(spec, context, relay, peers, stream, visible_before)
        if context.rank == 0 and spec.script is None:
            yield from _result_batches(result)
    except BaseException as error:
        failed = True
        if progress is not None and not isinstance(error, GeneratorExit):
            output = "\n".join(relay.tail()[-20:])
            progress.send(
                {
                    "kind": "error",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-8000:],
                    "output": output,
                }
            )
        traceback.clear_frames(error.__traceback__)  # frees the process group's store now
        raise
    finally:
        from deepspark.training.rank.rendezvous import destroy_process_group

        running(None)
        destroy_process_group()
        if stream is not None:
            stream.close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        relay.close()
        for path in context.cleanup:  # a script copied here for this run
            with contextlib.suppress(OSError):
                os.remove(path)
        if failed:
            gc.collect()
        if progress is not None:
            progress.close()


def _input(spec: RunSpec, batches: Iterable[pa.RecordBatch], context: RankContext) -> Any:
    """The task's rows spilled on a background thread, or ``None`` for a run without data."""
    if not spec.frames:
        for _ in batches:  # one row per task, saying only which rank this is
            pass
        return None
    from deepspark.data import rows_from_chunks
    from deepspark.data.stream import StreamingSpill

    return StreamingSpill(
        rows_from_chunks(batches), context.spill_dir, split_column=SPLIT_COLUMN, feed_split=None
    )


def _meet(spec: RunSpec, context: RankContext, progress: Any) -> list[dict[str, Any]]:
    """Every rank's host, port (rank 0's is the master port) and GPUs, in rank order."""
    from deepspark.context.topology import local_ip
    from deepspark.training.rank.rendezvous import free_port

    host = spec.rendezvous_host or local_ip()
    port = free_port(host) if context.rank == 0 else 0
    hello = {"rank": context.rank, "host": host, "port": port, "gpus": list(context.gpu_ids)}
    return exchange_hellos(spec, context, progress, hello)


def torchrun_environment(
    peers: list[dict[str, Any]], rank: int, *, use_gpu: bool = False
) -> dict[str, str]:
    """The variables ``torchrun`` would set for `rank`, from every rank's hello.

    ``LOCAL_RANK`` counts the ranks on the same host; ``GROUP_RANK`` numbers the hosts in the
    order their first rank appears. With GPUs, ``CUDA_VISIBLE_DEVICES`` lists the GPUs Spark
    gave this host's ranks, in local-rank order, so that device ``LOCAL_RANK`` (one GPU per
    task) is this rank's own, as under ``torchrun``.

    Examples
    --------
    >>> peers = [{"rank": 0, "host": "10.0.0.1", "port": 29500, "gpus": ["0"]},
    ...          {"rank": 1, "host": "10.0.0.1", "port": 0, "gpus": ["1"]},
    ...          {"rank": 2, "host": "10.0.0.2", "port": 0, "gpus": ["0"]}]
    >>> env = torchrun_environment(peers, 1, use_gpu=True)
    >>> [env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
    ...                   "LOCAL_WORLD_SIZE", "GROUP_RANK", "CUDA_VISIBLE_DEVICES")]
    ['10.0.0.1', '29500', '1', '1', '2', '0', '0,1']
    >>> torchrun_environment(peers, 2)["GROUP_RANK"]
    '1'
    """
    me = peers[rank]
    hosts = list(dict.fromkeys(str(peer["host"]) for peer in peers))
    neighbours = [peer for peer in peers if peer["host"] == me["host"]]
    environment = {
        "MASTER_ADDR": str(peers[0]["host"]),
        "MASTER_PORT": str(peers[0]["port"]),
        "RANK": str(rank),
        "WORLD_SIZE": str(len(peers)),
        "LOCAL_RANK": str(neighbours.index(me)),
        "LOCAL_WORLD_SIZE": str(len(neighbours)),
        "GROUP_RANK": str(hosts.index(str(me["host"]))),
        "NODE_RANK": str(hosts.index(str(me["host"]))),
    }
    if use_gpu and me.get("gpus"):
        gpus = [str(gpu) for peer in neighbours for gpu in peer.get("gpus", [])]
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(dict.fromkeys(gpus))
    elif str(me["host"]).startswith("127."):
        environment["GLOO_SOCKET_IFNAME"] = "lo"
    return environment


def _call_function(
    spec: RunSpec,
    context: RankContext,
    relay: OutputRelay,
    peers: list[dict[str, Any]],
    stream: Any,
    visible_before: str | None,
) -> Any:
    """Join the process group, then call the function with its output relayed."""
    import cloudpickle
    import torch

    from deepspark.training.rank.rendezvous import RendezvousSpec, init_process_group

    assert spec.function_blob is not None
    function, args, kwargs = cloudpickle.loads(spec.function_blob)
    torch.set_num_threads(max(1, context.task_cpus))
    keep_step_memory()
    device = _device(spec, context, visible_before)
    init_process_group(
        RendezvousSpec(
            master_addr=str(peers[0]["host"]),
            master_port=int(peers[0]["port"]),
            world_size=spec.world_size,
            backend="nccl" if device is not None else "gloo",
            timeout_s=spec.collective_timeout_s,
        ),
        context.rank,
    )
    spill = None

    def finished_spill() -> Any:
        nonlocal spill
        if spill is None:
            spill = stream.finish(spec.collective_timeout_s)
        return spill

    running(
        ActiveRun(
            rank=context.rank,
            world_size=spec.world_size,
            local_rank=int(os.environ["LOCAL_RANK"]),
            attempt=spec.attempt,
            checkpoint_dir=spec.recovery.checkpoint_dir,
            collective_timeout_s=spec.collective_timeout_s,
            spill=finished_spill if stream is not None else None,
            frame_indexes=tuple(frame.index for frame in spec.frames),
            device=device,
        )
    )
    with captured_output(relay):
        return function(*args, **kwargs)


def _device(spec: RunSpec, context: RankContext, visible_before: str | None) -> Any:
    """This rank's CUDA device (made current), or ``None`` on CPU; as `Estimator.fit` maps it.

    ``CUDA_VISIBLE_DEVICES`` was just set to this host's GPUs; a process whose CUDA started
    earlier (Spark reuses Python workers) still numbers devices by the value it had then.
    """
    if not spec.use_gpu:
        return None
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"rank {context.rank}: use_gpu=True but torch sees no CUDA device on this executor; "
            "install a CUDA build of torch there or run with use_gpu=False"
        )
    count = torch.cuda.device_count()
    if context.gpu_ids:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if torch.cuda.is_initialized():
            visible = visible_before
        index = cuda_device_index(context.gpu_ids[0], visible, count)
    else:  # no GPU resource scheduling: spread this machine's ranks over its devices
        index = int(os.environ["LOCAL_RANK"]) % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _run_script(
    spec: RunSpec, context: RankContext, relay: OutputRelay, environment: dict[str, str]
) -> None:
    """Run the script as a child process with the rank's environment; fail if it fails."""
    assert spec.script is not None
    path = spec.script
    if not os.path.exists(path) and spec.script_source is not None:
        # an executor on another machine: the driver's copy of the script, in the task's dir
        path = os.path.join(context.spill_dir, f"deepspark-{spec.job_id}-{os.path.basename(path)}")
        with open(path, "wb") as handle:
            handle.write(spec.script_source)
        context.cleanup.append(path)
    # defaults a user's own environment overrides
    defaults = {"OMP_NUM_THREADS": str(max(1, context.task_cpus)), **child_environment()}
    child = subprocess.Popen(
        [sys.executable, "-u", path, *spec.script_args],
        env={**defaults, **os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert child.stdout is not None and child.stderr is not None
    relay.follow("stdout", child.stdout)
    relay.follow("stderr", child.stderr)
    try:
        code = child.wait()
    except BaseException:
        # the task was cancelled (another rank failed): take the script down with it
        with contextlib.suppress(OSError):
            os.killpg(child.pid, 9)
        child.wait()
        raise
    finally:
        relay.join()
    if code != 0:
        tail = "\n".join(relay.tail()[-15:])
        raise RuntimeError(
            f"rank {context.rank}: the script {spec.script} exited with code {code}; its last "
            f"output:\n{tail}"
        )


def _result_batches(result: Any) -> Iterator[pa.RecordBatch]:
    """The function's return value, pickled, in the stage's result rows (bounded chunks)."""
    import cloudpickle

    try:
        blob = cloudpickle.dumps(result)
    except Exception as error:
        raise TypeError(
            f"rank 0's return value ({type(result).__name__}) cannot be pickled to reach the "
            f"driver: {error}; return plain values, tensors or a state dict"
        ) from error
    schema = pa.schema(
        [("rank", pa.int32()), ("kind", pa.string()), ("seq", pa.int32()), ("payload", pa.binary())]
    )
    for seq, start in enumerate(range(0, max(len(blob), 1), RESULT_CHUNK_BYTES)):
        yield pa.RecordBatch.from_pydict(
            {
                "rank": [0],
                "kind": [ResultKind.RETURN.value],
                "seq": [seq],
                "payload": [blob[start : start + RESULT_CHUNK_BYTES]],
            },
            schema=schema,
        )
