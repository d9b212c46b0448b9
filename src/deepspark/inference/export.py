"""Export a torch model to ONNX, TorchScript or a ``torch.export`` program, verified.

Every export runs the written file in its own runtime (ONNX Runtime, ``torch.jit.load``,
``torch.export.load``) on the sample inputs and compares with the eager model's output; a
difference above ``atol`` (1e-4 by default) raises :class:`ExportMismatchError`, so a file that
exists is a file that predicts what the model predicts.

ONNX uses torch's default exporter (``dynamo=True``, built on ``torch.export``; it needs
``onnxscript``, part of the ``onnx`` extra). The older TorchScript-based exporter is
deprecated in torch 2.9+ and due to be removed, so it is not the default here; pass
``dynamo=False`` through ``export_kwargs`` to use it for a model the new one cannot trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import torch

from deepspark.errors import DeepsparkError
from deepspark.inference.model_loading import load_model
from deepspark.inference.models import ModelKind, ModelSource, is_local
from deepspark.inference.runtimes import (
    evaluating,
    import_onnxruntime,
    torchscript_deprecation_silenced,
)

__all__ = ["ExportMismatchError", "export_onnx", "export_program", "export_torchscript"]

DEFAULT_ATOL = 1e-4


class ExportMismatchError(DeepsparkError, RuntimeError):
    """An exported model's output differs from the torch model's on the sample inputs."""


def _as_tuple(sample_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (sample_inputs,) if isinstance(sample_inputs, torch.Tensor) else tuple(sample_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs):
        raise ValueError(
            "sample_inputs must be a tensor or a tuple of tensors, each with a batch dimension"
        )
    if len({t.shape[0] for t in inputs}) != 1:
        raise ValueError("every sample input needs the same batch size (first dimension)")
    return inputs


def _dynamic_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """Inputs to trace and ``dynamic_shapes`` for ``torch.export`` with a free batch dimension."""
    # torch.export specialises a dimension of size 1 to a constant; a batch of at least two
    # rows keeps the batch dimension dynamic.
    traced = inputs if inputs[0].shape[0] >= 2 else tuple(torch.cat([t, t]) for t in inputs)
    batch = torch.export.Dim("batch")
    return traced, tuple({0: batch} for _ in inputs)


def _reference(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.inference_mode():
        output = model(*inputs)
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output.detach().cpu()


def _verify(path: str, kind: ModelKind, reference: torch.Tensor, inputs, atol: float) -> None:
    predictor = load_model(ModelSource.from_path(path, kind), cached=False)
    output = predictor(inputs)
    # the first output, as `_reference` takes it (a dict keeps the model's order)
    if isinstance(output, dict):
        output = next(iter(output.values()))
    elif isinstance(output, tuple):
        output = output[0]
    if output.shape != reference.shape:
        raise ExportMismatchError(
            f"the exported {kind.value} model at {path!r} returns shape {tuple(output.shape)}, "
            f"the torch model {tuple(reference.shape)}"
        )
    difference = (output.double() - reference.double()).abs().max().item()
    if not difference <= atol:
        raise ExportMismatchError(
            f"the exported {kind.value} model at {path!r} differs from the torch model by "
            f"{difference:.3g} (> atol={atol:g}) on the sample inputs"
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's internal notices (torch's own deprecations, absent torchvision ops)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def _check_writable(path: str | os.PathLike[str]) -> str:
    url = os.fspath(path)
    fs, root = fsspec.core.url_to_fs(url)
    parent = root.rsplit("/", 1)[0] if "/" in root else "."
    fs.makedirs(parent, exist_ok=True)
    return url


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    sample_inputs: torch.Tensor | Sequence[torch.Tensor],
    input_names: Sequence[str] | None = None,
    output_name: str = "output",
    *,
    dynamic_batch: bool = True,
    atol: float = DEFAULT_ATOL,
    **export_kwargs: Any,
) -> str:
    """Export ``model`` to an ONNX file and check it against torch with ONNX Runtime.

    Parameters
    ----------
    model : nn.Module
        The model; exported in eval mode.
    path : str or PathLike
        Where to write the ``.onnx`` file (local path or fsspec URL); the file holds its
        weights (no external data), so models must stay under ONNX's 2 GiB limit.
    sample_inputs : Tensor or tuple of Tensor
        Example inputs, batch dimension first; used to trace and to verify.
    input_names : sequence of str, optional
        Names of the ONNX inputs (default ``input_0``, ``input_1``, …); ``predict`` feeds
        feature columns to them in this order.
    output_name : str
        Name of the ONNX output.
    dynamic_batch : bool
        Keep the batch dimension free (otherwise the file takes only the sample's batch size).
    atol : float
        Largest accepted absolute difference from torch's output.
    **export_kwargs
        Passed on to ``torch.onnx.export`` (e.g. ``opset_version``, ``dynamo=False``).

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    ExportMismatchError
        When ONNX Runtime's output differs from torch's by more than ``atol``.

    Examples
    --------
    >>> import torch, tempfile, os
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> path = export_onnx(net, os.path.join(tempfile.mkdtemp(), "net.onnx"), torch.randn(3, 4))
    >>> path.endswith("net.onnx")
    True
    """
    import_onnxruntime()
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx: run `pip install deepspark[onnx]`") from err
    inputs = _as_tuple(sample_inputs)
    names = list(input_names) if input_names else [f"input_{i}" for i in range(len(inputs))]
    if len(names) != len(inputs) or len(set(names)) != len(names):
        raise ValueError(
            f"input_names={list(names)!r} needs one distinct name per sample input "
            f"({len(inputs)} given)"
        )
    url = _check_writable(path)
    with evaluating(model):
        options: dict[str, Any] = {"external_data": False, "dynamo": True, "verbose": False}
        options.update(export_kwargs)
        traced_inputs = inputs
        if dynamic_batch and options["dynamo"]:
            traced_inputs, dynamic_shapes = _dynamic_batch(inputs)
            options.setdefault("dynamic_shapes", dynamic_shapes)
        elif dynamic_batch:
            axes = {name: {0: "batch"} for name in [*names, output_name]}
            options.setdefault("dynamic_axes", axes)
        if not options["dynamo"]:
            options.pop("external_data")
        fs, root = fsspec.core.url_to_fs(url)
        local = is_local(fs)
        with tempfile.TemporaryDirectory(prefix="deepspark-onnx-") as scratch:
            # The exporter writes local files only; other URLs get a verified local copy.
            target = root if local else os.path.join(scratch, os.path.basename(root))
            try:
                with _quiet_exporter():
                    torch.onnx.export(
                        model,
                        traced_inputs,
                        target,
                        input_names=names,
                        output_names=[output_name],
                        **options,
                    )
            except ImportError as err:
                raise ImportError(
                    f"torch.onnx.export needs {err.name or 'onnxscript'}: run "
                    "`pip install deepspark[onnx]`"
                ) from err
            _verify(target, ModelKind.ONNX, _reference(model, inputs), inputs, atol)
            if not local:
                fs.put(target, root)
    return url


def export_torchscript(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    sample_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    method: str = "trace",
    atol: float = DEFAULT_ATOL,
) -> str:
    """Export ``model`` to TorchScript (``torch.jit``) and check it against the eager model.

    Parameters
    ----------
    model : nn.Module
        The model; exported in eval mode.
    path : str or PathLike
        Where to write the file (local path or fsspec URL).
    sample_inputs : Tensor or tuple of Tensor
        Example inputs, batch dimension first: traced (``method="trace"``) and used to verify.
    method : {"trace", "script"}
        ``torch.jit.trace`` (any model without data-dependent control flow) or
        ``torch.jit.script``.
    atol : float
        Largest accepted absolute difference from the eager output.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import torch, tempfile, os
    >>> net = torch.nn.Linear(4, 2)
    >>> path = export_torchscript(net, os.path.join(tempfile.mkdtemp(), "net.pt"), torch.ones(2, 4))
    >>> path.endswith("net.pt")
    True
    """
    if method not in ("trace", "script"):
        raise ValueError(f"method={method!r}: use 'trace' or 'script'")
    url = _check_writable(path)
    inputs = _as_tuple(sample_inputs)
    with evaluating(model):
        with torch.no_grad(), torchscript_deprecation_silenced():
            if method == "trace":
                # check_trace=False: the file itself is verified below, in its own runtime.
                scripted = torch.jit.trace(model, inputs, check_trace=False)
            else:
                scripted = torch.jit.script(model)
        with fsspec.open(url, "wb") as file, torchscript_deprecation_silenced():
            torch.jit.save(scripted, file)
        _verify(url, ModelKind.TORCHSCRIPT, _reference(model, inputs), inputs, atol)
    return url


def export_program(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    sample_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = True,
    atol: float = DEFAULT_ATOL,
) -> str:
    """Export ``model`` with ``torch.export`` to a ``.pt2`` file and check it.

    Parameters
    ----------
    model : nn.Module
        The model; exported in eval mode.
    path : str or PathLike
        Where to write the ``.pt2`` file (local path or fsspec URL).
    sample_inputs : Tensor or tuple of Tensor
        Example inputs, batch dimension first.
    dynamic_batch : bool
        Keep the batch dimension free.
    atol : float
        Largest accepted absolute difference from the eager output.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import torch, tempfile, os
    >>> net = torch.nn.Linear(4, 2)
    >>> path = export_program(net, os.path.join(tempfile.mkdtemp(), "net.pt2"), torch.ones(2, 4))
    >>> path.endswith(".pt2")
    True
    """
    url = _check_writable(path)
    inputs = _as_tuple(sample_inputs)
    with evaluating(model):
        traced_inputs, dynamic_shapes = _dynamic_batch(inputs) if dynamic_batch else (inputs, None)
        with _quiet_exporter():
            program = torch.export.export(model, traced_inputs, dynamic_shapes=dynamic_shapes)
        with fsspec.open(url, "wb") as file:
            torch.export.save(program, file)
        _verify(url, ModelKind.TORCH_EXPORT, _reference(model, inputs), inputs, atol)
    return url
