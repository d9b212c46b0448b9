"""Model weights as safetensors, in memory or at any fsspec URL (worker side; no pyspark).

A state dict goes through one preparation before safetensors sees it: tensors are detached,
copied to the CPU and made contiguous; tied entries (the very same tensor under several names,
as in a language model's shared embedding) are stored once and named in the file's metadata;
different views of one storage (slices of a fused buffer) are stored as copies. Reading restores
each tied name as the same tensor, so ``model.load_state_dict(..., strict=True)`` accepts it.

:func:`weights_to_bytes` and :func:`weights_from_bytes` do this in memory;
:func:`save_model_weights` and :func:`load_model_weights` do it for files, streaming local ones
and going through the in-memory functions for other stores. Loading runs no code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

__all__ = [
    "load_model_weights",
    "save_model_weights",
    "unwrap_model",
    "weights_from_bytes",
    "weights_to_bytes",
]

_ALIASES_KEY = "deepspark.aliases"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DistributedDataParallel, DataParallel or torch.compile
    wrappers (the model itself when unwrapped).

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(1, 1)
    >>> unwrap_model(torch.nn.DataParallel(layer)) is layer
    True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _weights_for_safetensors(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors accepts (contiguous, CPU, no shared memory) and the aliases of tied
    entries: ``{name: name_it_is_identical_to}``."""
    first_view: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
        tensor = tensor.detach()
        if tensor.numel() > 0:
            view = (
                *_storage_key(tensor),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
            )
            if view in first_view:  # tied weights: the very same view under a second name
                aliases[name] = first_view[view]
                continue
            first_view[view] = name
        kept[name] = tensor
    # Different views of one storage (a slice of a fused buffer, say) are stored as copies.
    owners: dict[tuple[Any, ...], int] = {}
    for tensor in kept.values():
        if tensor.numel() > 0:
            owners[_storage_key(tensor)] = owners.get(_storage_key(tensor), 0) + 1
    tensors = {}
    for name, tensor in kept.items():
        shared = tensor.numel() > 0 and owners[_storage_key(tensor)] > 1
        tensor = tensor.to("cpu").contiguous()
        tensors[name] = tensor.clone() if shared else tensor
    return tensors, aliases


def _prepared(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store and the safetensors metadata naming the tied entries."""
    tensors, aliases = _weights_for_safetensors(state_dict)
    return tensors, {_ALIASES_KEY: json.dumps(aliases)}


def _with_aliases(
    tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    for alias, target in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    return dict(header.get("__metadata__") or {})


def weights_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state dict to safetensors bytes.

    Tied entries are stored once and restored under every name by :func:`weights_from_bytes`;
    non-contiguous tensors are made contiguous and GPU tensors copied to the CPU.

    Parameters
    ----------
    state_dict : mapping of str to torch.Tensor
        Usually ``unwrap_model(model).state_dict()``.

    Returns
    -------
    bytes
        A complete safetensors file.

    Raises
    ------
    TypeError
        When an entry is not a tensor.

    Examples
    --------
    >>> import torch
    >>> shared = torch.ones(2)
    >>> data = weights_to_bytes({"encoder": shared, "decoder": shared})
    >>> state = weights_from_bytes(data)
    >>> state["decoder"] is state["encoder"], state["encoder"].tolist()
    (True, [1.0, 1.0])
    """
    from safetensors.torch import save

    tensors, metadata = _prepared(state_dict)
    return save(tensors, metadata=metadata)


def weights_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Read safetensors bytes (from :func:`weights_to_bytes`, or any safetensors file) into a
    state dict.

    Loading runs no code. Tied entries come back as the same tensor under each name.

    Parameters
    ----------
    data : bytes
        A complete safetensors file.

    Returns
    -------
    dict of str to torch.Tensor
        CPU tensors.

    Examples
    --------
    >>> import torch
    >>> weights_from_bytes(weights_to_bytes({"w": torch.zeros(2)}))["w"].tolist()
    [0.0, 0.0]
    """
    from safetensors.torch import load

    data = bytes(data)  # safetensors takes bytes only; a no-op for bytes
    return _with_aliases(load(data), _safetensors_metadata(data))


def save_model_weights(path: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict as one safetensors file at an fsspec URL.

    The file holds what :func:`weights_to_bytes` returns: tied parameters stored once and
    restored under every name, non-contiguous tensors made contiguous, GPU tensors copied to
    the CPU.

    Parameters
    ----------
    path : str
        Local path or fsspec URL of the file to write.
    state_dict : mapping of str to torch.Tensor
        Usually ``model.state_dict()``.

    Raises
    ------
    TypeError
        When an entry is not a tensor.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> save_model_weights("memory://doc/weights.safetensors", layer.state_dict())
    >>> sorted(load_model_weights("memory://doc/weights.safetensors"))
    ['bias', 'weight']
    """
    fs, local_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        from safetensors.torch import save_file

        tensors, metadata = _prepared(state_dict)
        _make_parent(fs, local_path)
        save_file(tensors, local_path, metadata=metadata)  # streams; no second copy in memory
    else:
        data = weights_to_bytes(state_dict)
        _make_parent(fs, local_path)
        with fs.open(local_path, "wb") as handle:
            handle.write(data)


def _make_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    parent = os.path.dirname(path.rstrip("/"))
    if parent:
        fs.makedirs(parent, exist_ok=True)


def load_model_weights(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by :func:`save_model_weights` into a state dict.

    Loading runs no code. Tied entries come back as the same tensor under each name, so
    ``model.load_state_dict(..., strict=True)`` accepts the result.

    Parameters
    ----------
    path : str
        Local path or fsspec URL.

    Returns
    -------
    dict of str to torch.Tensor
        CPU tensors.

    Examples
    --------
    >>> import torch
    >>> save_model_weights("memory://doc/w.safetensors", {"w": torch.ones(2)})
    >>> load_model_weights("memory://doc/w.safetensors")["w"].tolist()
    [1.0, 1.0]
    """
    fs, local_path = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(local_path, "rb") as stream:
            return weights_from_bytes(stream.read())
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(local_path)
    with safe_open(local_path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return _with_aliases(tensors, metadata)
