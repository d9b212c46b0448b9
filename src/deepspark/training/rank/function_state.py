"""What a user's function sees of the `deepspark.run` job it runs in (worker side; no pyspark).

`rank._function_rank` sets the active run while the function runs; `deepspark.shard` reads its
data from it, and `deepspark.checkpoint` / `deepspark.restore` its checkpoint directory (the
same fsspec directories and checkpoint format as `Estimator.fit`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ActiveRun", "active_run", "checkpoint", "restore", "running"]

_lock = threading.Lock()
_active: ActiveRun | None = None


@dataclass
class ActiveRun:
    """This rank's place in the run, and where its data and checkpoints are."""

    rank: int
    world_size: int
    local_rank: int
    attempt: int
    checkpoint_dir: str | None
    collective_timeout_s: float
    # the rank's spilled input (every DataFrame of the run, one split each); waits for the
    # input's end the first time
    spill: Callable[[], Any] | None = None
    frame_indexes: tuple[int, ...] = ()
    device: Any = None
    shards: list[Any] = field(default_factory=list)


def running(run: ActiveRun | None) -> None:
    """Set (or, with ``None``, clear) the run this process's function belongs to."""
    global _active
    with _lock:
        _active = run


def active_run(what: str) -> ActiveRun:
    """The run this function belongs to; `what` names the call in the error outside one."""
    with _lock:
        run = _active
    if run is None:
        raise RuntimeError(
            f"{what} works inside a function that deepspark.run runs on the ranks; call it "
            "there (e.g. ds.run(train, df, num_workers=2) with train calling it)"
        )
    return run


def checkpoint(state: dict[str, Any], *, epoch: int | None = None, keep: int | None = 2) -> None:
    """Save `state` as the run's latest checkpoint (rank 0 writes; other ranks return at once).

    The checkpoint goes to the run's checkpoint directory (``deepspark.run(checkpoint_dir=...)``,
    or a private one on a local master), in the format `Estimator.fit` uses: a crash while
    saving never leaves a checkpoint that looks complete. When the run is re-run after a
    failure (``max_failures``), `restore` returns the latest state saved.

    Parameters
    ----------
    state : dict
        Tensors and plain values (numbers, strings, lists, dicts of them), e.g.
        ``{"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}``.
        Loading it back unpickles no code (``torch.load(weights_only=True)``).
    epoch : int, optional
        The checkpoint's number (the epoch just finished); by default one more than the latest.
    keep : int or None
        How many checkpoints to keep (None: all).

    Examples
    --------
    >>> import deepspark as ds
    >>> def train(df):  # doctest: +SKIP
    ...     start = (ds.restore() or {"epoch": -1})["epoch"] + 1
    ...     for epoch in range(start, 3):
    ...         ...  # train one epoch
    ...         ds.checkpoint({"model": model.state_dict(), "epoch": epoch})
    """
    from deepspark.training.rank.checkpoint import latest_checkpoint, save_checkpoint

    run = active_run("deepspark.checkpoint")
    if not isinstance(state, dict):
        raise TypeError(
            f"deepspark.checkpoint(state): state must be a dict of tensors and plain values, "
            f"got {type(state).__name__}"
        )
    directory = _directory(run, "deepspark.checkpoint")
    if run.rank != 0:
        return
    if epoch is None:
        latest = latest_checkpoint(directory)
        epoch = 0 if latest is None else latest.epoch + 1
    save_checkpoint(directory, int(epoch), None, state=state, keep=keep)


def restore() -> dict[str, Any] | None:
    """The state the run saved last with `checkpoint`, or ``None`` when it saved none yet.

    Every rank reads it (the checkpoint directory must be reachable from all executors, as for
    `Estimator.fit`). A function that starts with ``restore()`` continues where a failed
    attempt stopped: the epochs it finished are not trained again.

    Examples
    --------
    >>> import deepspark as ds
    >>> ds.restore()  # doctest: +SKIP
    {'model': OrderedDict(...), 'epoch': 1}
    """
    from deepspark.training.rank.checkpoint import latest_checkpoint, load_state

    run = active_run("deepspark.restore")
    directory = _directory(run, "deepspark.restore")
    latest = latest_checkpoint(directory)
    if latest is None:
        return None
    return load_state(latest)


def _directory(run: ActiveRun, what: str) -> str:
    if run.checkpoint_dir is None:
        raise RuntimeError(
            f"{what} needs a checkpoint directory: pass ds.run(..., checkpoint_dir=URL) (a "
            "path or fsspec URL every executor can reach); on a local master max_failures > 0 "
            "also gives the run a private one"
        )
    return run.checkpoint_dir
