"""Training checkpoints at any fsspec URL, written so that a crash never leaves one that looks
complete (worker side; no pyspark).

Layout of a checkpoint directory::

    <directory>/
        LATEST                  name of the newest complete checkpoint, written last
        epoch-000003/
            model.safetensors   model weights (safetensors: loading runs no code)
            optimizer.pt        optimizer state (torch.save; loaded with weights_only=True)
            scheduler.pt        LR scheduler state (same)
            rng.pt              torch, CUDA, numpy and Python RNG states (same)
            state.pt            a user function's own state (`deepspark.checkpoint`; same)
            checkpoint.json     manifest, written last: epoch, extra, every file and its size

A checkpoint is complete when its manifest exists and every file it lists has the listed size.
On a local file system the checkpoint is written under a temporary name and renamed into place
(an atomic rename); stores without renames (object stores, ``memory://``) write in place and
rely on the manifest and the ``LATEST`` pointer, both written after the data. Readers trust
``LATEST`` when it names a complete checkpoint and otherwise take the complete checkpoint of
the highest epoch.

Only one process (rank 0) should write to a directory at a time. The model weights go through
:mod:`deepspark.persist.weights`, and the RNG states
through :mod:`deepspark.training.rank.rng_state`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from deepspark.persist.weights import load_model_weights, save_model_weights, unwrap_model
from deepspark.training.rank.rng_state import get_rng_state, set_rng_state

__all__ = [
    "CheckpointInfo",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state",
    "save_checkpoint",
]

_log = logging.getLogger(__name__)

LATEST = "LATEST"
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.pt"
_FORMAT_VERSION = 1
_NAME = re.compile(r"epoch-(\d+)")
_STAGING_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: where it is and what it holds.

    Attributes
    ----------
    path : str
        URL of the checkpoint's folder, in the same form as the directory it was found in.
    epoch : int
        The epoch the checkpoint was saved after (0-based); training resumes at ``epoch + 1``.
    created : float
        Unix time of the save.
    extra : dict
        The JSON-able ``extra`` passed to :func:`save_checkpoint`.
    files : dict of str to int
        Each file of the checkpoint and its size in bytes.

    Examples
    --------
    >>> import torch
    >>> info = save_checkpoint("memory://doc/info", 2, torch.nn.Linear(1, 1))
    >>> info.path, info.epoch, sorted(info.files)
    ('memory://doc/info/epoch-000002', 2, ['checkpoint.json', 'model.safetensors', 'rng.pt'])
    """

    path: str
    epoch: int
    created: float
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.path


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as handle:
        handle.write(data)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(fs: fsspec.AbstractFileSystem, path: str, map_location: Any) -> Any:
    with fs.open(path, "rb") as handle:
        data = handle.read()
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


# --- finding checkpoints ----------------------------------------------------------------------


def _read_complete(fs: fsspec.AbstractFileSystem, folder: str, url: str) -> CheckpointInfo | None:
    """The checkpoint in ``folder`` if it is complete, else None."""
    try:
        with fs.open(_join(folder, MANIFEST), "rb") as handle:
            manifest = json.loads(handle.read())
        files = {str(name): int(size) for name, size in manifest["files"].items()}
        for name, size in files.items():
            if fs.size(_join(folder, name)) != size:
                return None
        return CheckpointInfo(
            path=url,
            epoch=int(manifest["epoch"]),
            created=float(manifest["created"]),
            extra=dict(manifest.get("extra") or {}),
            files=files,
        )
    except (OSError, ValueError, KeyError, TypeError):  # missing, partial or corrupt files
        return None


def _children(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    try:
        return sorted(os.path.basename(path.rstrip("/")) for path in fs.ls(root, detail=False))
    except FileNotFoundError:
        return []


def list_checkpoints(directory: str) -> list[CheckpointInfo]:
    """Return the complete checkpoints under ``directory``, oldest epoch first.

    Parameters
    ----------
    directory : str
        Local path or fsspec URL given to :func:`save_checkpoint`.

    Returns
    -------
    list of CheckpointInfo

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> for epoch in range(3):
    ...     _ = save_checkpoint("memory://doc/listed", epoch, model, keep=2)
    >>> [info.epoch for info in list_checkpoints("memory://doc/listed")]
    [1, 2]
    """
    fs, root = fsspec.core.url_to_fs(directory)
    found = []
    for name in _children(fs, root):
        if _NAME.fullmatch(name):
            info = _read_complete(fs, _join(root, name), _join(directory, name))
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda info: info.epoch)


def latest_checkpoint(directory: str) -> CheckpointInfo | None:
    """Return the newest complete checkpoint under ``directory``, or None.

    The ``LATEST`` pointer decides when it names a complete checkpoint; otherwise (a crash
    between writing a checkpoint and its pointer, a pointer to a deleted folder) the complete
    checkpoint of the highest epoch does.

    Parameters
    ----------
    directory : str
        Local path or fsspec URL given to :func:`save_checkpoint`.

    Returns
    -------
    CheckpointInfo or None
        None when there is no complete checkpoint (or no directory).

    Examples
    --------
    >>> latest_checkpoint("memory://doc/nothing-here") is None
    True
    """
    fs, root = fsspec.core.url_to_fs(directory)
    try:
        with fs.open(_join(root, LATEST), "rb") as handle:
            name = handle.read().decode().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _NAME.fullmatch(name):
        info = _read_complete(fs, _join(root, name), _join(directory, name))
        if info is not None:
            return info
        _log.warning(
            "%s names %s, which is not complete; using the newest complete one",
            _join(directory, LATEST),
            name,
        )
    complete = list_checkpoints(directory)
    return complete[-1] if complete else None


# --- saving and loading -----------------------------------------------------------------------


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def save_checkpoint(
    directory: str,
    epoch: int,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = 2,
    state: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Save a complete training checkpoint under ``directory``, atomically.

    Writes the model weights (safetensors), the optimizer's and scheduler's state dicts, the
    torch/CUDA/numpy/Python RNG states and ``extra``, then the manifest, then the ``LATEST``
    pointer; see the module docstring for why a crash at any point leaves the previous
    checkpoint as the latest. Saving an epoch that already has a checkpoint replaces it.

    Parameters
    ----------
    directory : str
        Local path or fsspec URL (``file://``, ``memory://``, ``s3://``, ...); created if needed.
    epoch : int
        The epoch just finished (0-based).
    model : torch.nn.Module or None
        Its weights are saved; DistributedDataParallel, DataParallel and torch.compile wrappers
        are looked through. ``None`` saves no model (a checkpoint of `state` alone).
    optimizer : torch.optim.Optimizer, optional
    scheduler : object with ``state_dict()``, optional
        An LR scheduler (or anything whose state dict holds tensors and plain values).
    extra : dict, optional
        JSON-able values to keep with the checkpoint, such as the history so far.
    keep : int or None, default 2
        How many checkpoints to keep: this one and the newest ``keep - 1`` of earlier epochs.
        Older ones, leftovers of crashed saves and checkpoints of later epochs (from an earlier
        run that this one replaces) are deleted. None keeps all.
    state : dict, optional
        Any further tensors and plain values (a user function's own state, see
        `deepspark.checkpoint`); read back with `load_state`.

    Returns
    -------
    CheckpointInfo

    Raises
    ------
    TypeError
        When ``extra`` is not JSON-able.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> info = save_checkpoint("memory://doc/run", 0, model, extra={"note": "first"})
    >>> info.epoch, latest_checkpoint("memory://doc/run").extra
    (0, {'note': 'first'})
    """
    if epoch < 0:
        raise ValueError(f"epoch must be 0 or more, got {epoch}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be at least 1 or None, got {keep}")
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as error:
        raise TypeError(f"extra must be JSON-able: {error}") from error

    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    name = _checkpoint_name(epoch)
    final = _join(root, name)
    renames = isinstance(fs, LocalFileSystem)  # os.rename is atomic; object-store moves are not
    staging = _join(root, f"{_STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}") if renames else final
    if not renames and fs.exists(final):
        fs.rm(final, recursive=True)
    fs.makedirs(staging, exist_ok=True)
    try:
        files = _write_checkpoint_files(fs, staging, model, optimizer, scheduler, state)
        created = time.time()
        manifest = {
            "format": _FORMAT_VERSION,
            "epoch": int(epoch),
            "created": created,
            "files": files,
            "extra": extra,
            "torch_version": torch.__version__,
        }
        _write_bytes(fs, _join(staging, MANIFEST), json.dumps(manifest, indent=1).encode())
        if renames:
            if fs.exists(final):
                fs.rm(final, recursive=True)
            os.rename(staging, final)
        _write_pointer(fs, root, name)
    except BaseException:
        with contextlib.suppress(OSError):  # best effort: readers skip incomplete folders
            fs.rm(staging, recursive=True)
        raise
    files[MANIFEST] = fs.size(_join(final, MANIFEST))
    info = CheckpointInfo(_join(directory, name), int(epoch), created, extra, files)
    if keep is not None:
        _prune(fs, root, directory, int(epoch), keep)
    return info


def _write_checkpoint_files(
    fs: fsspec.AbstractFileSystem,
    folder: str,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: dict[str, Any] | None = None,
) -> dict[str, int]:
    if model is not None:
        save_model_weights(
            fs.unstrip_protocol(_join(folder, MODEL_FILE)), unwrap_model(model).state_dict()
        )
    if optimizer is not None:
        _write_bytes(fs, _join(folder, OPTIMIZER_FILE), _torch_bytes(optimizer.state_dict()))
    if scheduler is not None:
        _write_bytes(fs, _join(folder, SCHEDULER_FILE), _torch_bytes(scheduler.state_dict()))
    if state is not None:
        _write_bytes(fs, _join(folder, STATE_FILE), _torch_bytes(state))
    _write_bytes(fs, _join(folder, RNG_FILE), _torch_bytes(get_rng_state()))
    written = [RNG_FILE] + [MODEL_FILE] * (model is not None) + [STATE_FILE] * (state is not None)
    written += [OPTIMIZER_FILE] if optimizer is not None else []
    written += [SCHEDULER_FILE] if scheduler is not None else []
    return {name: int(fs.size(_join(folder, name))) for name in sorted(written)}


def _write_pointer(fs: fsspec.AbstractFileSystem, root: str, name: str) -> None:
    pointer = _join(root, LATEST)
    if isinstance(fs, LocalFileSystem):
        temporary = f"{pointer}{_STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        with open(temporary, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, pointer)
    else:
        _write_bytes(fs, pointer, (name + "\n").encode())  # one object write: all or nothing


def _prune(fs: fsspec.AbstractFileSystem, root: str, directory: str, epoch: int, keep: int):
    complete = {info.epoch for info in list_checkpoints(directory)}
    older = sorted((e for e in complete if e < epoch), reverse=True)
    keep_epochs = {epoch, *older[: keep - 1]}
    for name in _children(fs, root):
        match = _NAME.fullmatch(name)
        stale_staging = name.startswith(_STAGING_PREFIX)
        # Deleted: older checkpoints beyond `keep`, folders a crashed save left incomplete,
        # and later epochs of an earlier run that this one has replaced.
        if match and int(match.group(1)) in keep_epochs:
            continue
        if not match and not stale_staging:
            continue
        try:
            fs.rm(_join(root, name), recursive=True)
        except OSError as error:
            _log.warning("could not delete old checkpoint %s: %s", _join(directory, name), error)


def load_checkpoint(
    checkpoint: CheckpointInfo | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    map_location: Any = "cpu",
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint into a model (and optimizer, scheduler, RNGs).

    Nothing is unpickled beyond tensors and plain values (``weights_only=True``).

    Parameters
    ----------
    checkpoint : CheckpointInfo or str
        A checkpoint from :func:`latest_checkpoint`, the URL of one checkpoint folder, or a
        checkpoint directory (its latest complete checkpoint is loaded).
    model : torch.nn.Module
        Receives the weights (wrappers are looked through).
    optimizer, scheduler : optional
        Receive their saved states when given.
    map_location : str or torch.device, default "cpu"
        Where optimizer and scheduler tensors are loaded (the optimizer then moves its state
        to its parameters' device).
    restore_rng : bool, default True
        Also restore the torch, CUDA, numpy and Python RNG states saved with the checkpoint.
    strict : bool, default True
        Passed to ``model.load_state_dict``.

    Returns
    -------
    dict
        ``{"epoch": int, "extra": dict, "path": str, "created": float}``.

    Raises
    ------
    FileNotFoundError
        When there is no complete checkpoint there.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> _ = save_checkpoint("memory://doc/resume", 4, model)
    >>> load_checkpoint("memory://doc/resume", torch.nn.Linear(2, 1))["epoch"]
    4
    """
    info = _resolve(checkpoint)
    fs, folder = fsspec.core.url_to_fs(info.path)
    unwrap_model(model).load_state_dict(
        load_model_weights(info.path + "/" + MODEL_FILE), strict=strict
    )
    for target, file_name in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        if target is None:
            continue
        if file_name not in info.files:
            what = file_name.split(".")[0]
            raise ValueError(
                f"{info.path} holds no {what} state (it was saved without one); pass "
                f"{what}=None to skip restoring it"
            )
        target.load_state_dict(_torch_load(fs, _join(folder, file_name), map_location))
    if restore_rng:
        set_rng_state(_torch_load(fs, _join(folder, RNG_FILE), "cpu"))
    return {"epoch": info.epoch, "extra": info.extra, "path": info.path, "created": info.created}


def load_state(checkpoint: CheckpointInfo | str) -> dict[str, Any]:
    """The `state` saved with a checkpoint (see `save_checkpoint`); unpickles no code.

    Examples
    --------
    >>> _ = save_checkpoint("memory://doc/state", 1, None, state={"epoch": 1, "w": [0.5]})
    >>> load_state("memory://doc/state")
    {'epoch': 1, 'w': [0.5]}
    """
    info = _resolve(checkpoint)
    if STATE_FILE not in info.files:
        raise ValueError(f"{info.path} holds no state (it was saved without one)")
    fs, folder = fsspec.core.url_to_fs(info.path)
    return _torch_load(fs, _join(folder, STATE_FILE), "cpu")


def _resolve(checkpoint: CheckpointInfo | str) -> CheckpointInfo:
    if isinstance(checkpoint, CheckpointInfo):
        return checkpoint
    fs, path = fsspec.core.url_to_fs(checkpoint)
    if fs.exists(_join(path, MANIFEST)):
        info = _read_complete(fs, path, checkpoint.rstrip("/"))
        if info is None:
            raise FileNotFoundError(f"{checkpoint} is an incomplete checkpoint (a crashed save)")
        return info
    info = latest_checkpoint(checkpoint)
    if info is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint}")
    return info
