"""One predictor class per runtime: eager torch, TorchScript, ``torch.export`` and ONNX Runtime.

Worker side: no pyspark here. A predictor maps the model's positional arguments (tensors, or
dicts of tensors for a ``feature_cols`` dict or struct columns) to its outputs on the CPU: one
tensor, or a dict or tuple of tensors for a model with several outputs, in eval mode under
``torch.inference_mode``. When the runtime
rejects the inputs, the predictor raises :class:`ModelInputError` naming the shapes it was
given and what the model expects, so a user sees "column 'features' gives (N, 5), the model
expects (N, 4)" instead of a matrix-multiplication message from deep inside the model.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from deepspark.errors import DeepsparkError

__all__ = [
    "ExportedProgramPredictor",
    "ModelInputError",
    "OnnxPredictor",
    "Outputs",
    "Predictor",
    "TorchModulePredictor",
    "TorchScriptPredictor",
    "import_onnxruntime",
    "input_leaves",
    "outputs_on_cpu",
]


class ModelInputError(DeepsparkError, ValueError):
    """The features given to a model do not fit its inputs (shape, count, dtype or name)."""


def import_onnxruntime() -> Any:
    """Import onnxruntime, or say which extra installs it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX models need onnxruntime: run `pip install deepspark[onnx]`"
        ) from err
    return onnxruntime


@contextlib.contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Silence torch's "torch.jit is deprecated" warnings: TorchScript files stay supported."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for the block; every submodule's own mode comes back after."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


Outputs = torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...]
"""What a predictor returns: one tensor, or a model's several outputs (a dict or a tuple)."""


def input_leaves(inputs: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """Every input tensor with where it sits: ``""`` for an argument, ``"['text']"`` in a dict.

    Tensors come in the order the feature specs list them (dicts keep that order).
    """
    leaves: list[tuple[str, torch.Tensor]] = []

    def visit(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{where}[{key!r}]")
        else:
            leaves.append((where, value))

    for value in inputs:
        visit(value, "")
    return leaves


def _on_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    if value.device == device:
        return value  # the common CPU case: no call into torch per model batch
    return value.to(device, non_blocking=True)


def describe_shapes(inputs: Sequence[Any], names: Sequence[str] | None = None) -> str:
    """``'features' (N=3, 5) float32`` for each input, the batch dimension shown as ``N=``.

    ``names`` are the columns of the input tensors in order; a tensor inside a dict argument
    also shows its key, ``'tokens' as ['text']``.
    """
    parts = []
    for index, (where, tensor) in enumerate(input_leaves(inputs)):
        label = repr(names[index]) if names and index < len(names) else f"input {index}"
        if where:
            label += f" as {where}"
        dims = list(tensor.shape)
        shape = ", ".join([f"N={dims[0]}", *map(str, dims[1:])]) if dims else "scalar"
        parts.append(f"{label} ({shape}) {str(tensor.dtype).removeprefix('torch.')}")
    return "; ".join(parts)


class Predictor(ABC):
    """A loaded model, ready to run batches: ``predictor(inputs) -> Outputs``.

    Subclasses hold the runtime's object and know how to describe its expected inputs.
    Models with several outputs give them all: a dict by name (a model's dict or named tuple,
    an ONNX model's output names) or a tuple.
    """

    runtime: ClassVar[str]

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory the model's weights take, for the cache's byte budget."""

    @abstractmethod
    def expected_inputs(self) -> str:
        """What the model takes, in words, for error messages."""

    @abstractmethod
    def _run(self, inputs: tuple[Any, ...], input_names: Sequence[str] | None) -> Any:
        """Run the runtime on one batch; may raise the runtime's own errors."""

    def input_count(self) -> int | None:
        """How many input tensors the model takes (dict arguments flattened), when the
        runtime says so."""
        return None

    def check_input_names(self, input_names: Sequence[str] | None) -> None:
        """Refuse input names; only runtimes with named inputs (ONNX) accept them."""
        if input_names:
            raise ModelInputError(
                f"input_names={list(input_names)!r} applies to ONNX models only; "
                f"this is a {self.runtime} model: leave input_names out"
            )

    def __call__(
        self,
        inputs: Sequence[Any],
        *,
        input_names: Sequence[str] | None = None,
        column_names: Sequence[str] | None = None,
    ) -> Outputs:
        """Run one batch and return the outputs on the CPU.

        Parameters
        ----------
        inputs : sequence of Tensor or dict
            The model's positional arguments, batch dimension first: one tensor per feature
            column, or dicts of them (`deepspark.data.assemble`).
        input_names : sequence of str, optional
            ONNX only: the model inputs the tensors feed, in order.
        column_names : sequence of str, optional
            The columns the tensors came from, in order, to name them in error messages.

        Returns
        -------
        Tensor, dict of Tensor or tuple of Tensor
            The model's output; a one-element tuple or list is its one tensor.
        """
        inputs = tuple(inputs)
        count = self.input_count()
        if count is not None and (given := len(input_leaves(inputs))) != count:
            raise ModelInputError(
                f"the model takes {count} input(s) but {given} feature tensor(s) were "
                f"given ({describe_shapes(inputs, column_names)}); the model expects "
                f"{self.expected_inputs()}"
            )
        try:
            if torch.is_inference_mode_enabled():  # predict enters it once per Arrow batch
                output = self._run(inputs, input_names)
            else:
                with torch.inference_mode():
                    output = self._run(inputs, input_names)
        except ModelInputError:
            raise
        except Exception as err:
            # The runtimes report bad shapes as RuntimeError (torch), AssertionError (export
            # guards) or their own classes (onnxruntime): all say the same to the user.
            raise ModelInputError(
                f"the {self.runtime} model failed on features "
                f"{describe_shapes(inputs, column_names)}; the model expects "
                f"{self.expected_inputs()}. {type(err).__name__}: {_first_lines(err)}"
            ) from err
        return outputs_on_cpu(output)


def _first_lines(err: BaseException) -> str:
    """The runtime's message, shortened: TorchScript puts the cause on its last line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 3:
        return " ".join(lines)
    return f"{lines[0]} … {lines[-1]}"


def outputs_on_cpu(output: Any) -> Outputs:
    """A model's return value as predict writes it: a tensor, a dict or a tuple of tensors.

    Lists become tuples, named tuples dicts; a one-element tuple or list is its tensor.
    Numpy arrays (ONNX Runtime) become tensors.

    Examples
    --------
    >>> sorted(outputs_on_cpu({"a": torch.zeros(2), "b": torch.ones(2)}))
    ['a', 'b']
    >>> outputs_on_cpu([torch.zeros(2)]).shape
    torch.Size([2])
    """
    if isinstance(output, tuple) and hasattr(output, "_asdict"):
        output = output._asdict()
    if isinstance(output, (tuple, list)):
        if not output:
            raise ModelInputError("the model returned an empty tuple; it must return a tensor")
        if len(output) == 1:
            return outputs_on_cpu(output[0])
        return tuple(_tensor_on_cpu(item, f"position {i}") for i, item in enumerate(output))
    if isinstance(output, dict):
        if not output:
            raise ModelInputError("the model returned an empty dict; it must return tensors")
        for key in output:
            if not isinstance(key, str):
                raise ModelInputError(
                    f"the model returned a dict with key {key!r}; predict names a column "
                    "after each key, so the keys must be strings"
                )
        return {key: _tensor_on_cpu(item, repr(key)) for key, item in output.items()}
    return _tensor_on_cpu(output, None)


def _tensor_on_cpu(value: Any, where: str | None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        found = f"a {type(value).__name__}" + (f" at output {where}" if where else "")
        raise ModelInputError(
            f"the model returned {found}; predict needs a tensor, or a dict, tuple or list "
            "of tensors (one column each)"
        )
    return value.detach().cpu()


def _tensor_bytes(tensors: Any) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _type_name(module: torch.nn.Module) -> str:
    # TorchScript modules keep the eager class name in `original_name`.
    return getattr(module, "original_name", None) or type(module).__name__


def _first_layer_inputs(module: torch.nn.Module) -> str:
    """Read the expected input from the first Linear/Conv/Embedding layer, when there is one."""
    for submodule in module.modules():
        name = _type_name(submodule)
        weight = getattr(submodule, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        if name == "Linear" or name.startswith("LazyLinear"):
            return f"(N, {weight.shape[1]}) floating point (first layer {name})"
        if name.startswith("Conv") and weight.dim() >= 3:
            spatial = ", ".join("…" for _ in range(weight.dim() - 2))
            return f"(N, {weight.shape[1]}, {spatial}) floating point (first layer {name})"
        if name == "Embedding":
            return f"(N, …) integer ids below {weight.shape[0]} (first layer Embedding)"
        return f"what its first layer {name} takes"
    return "an input this message cannot read from the model"


class _ModulePredictor(Predictor):
    """Shared by eager and TorchScript modules: both expose parameters and buffers."""

    def __init__(self, module: torch.nn.Module, device: str = "cpu") -> None:
        super().__init__(device)
        self.module = module.to(self.device).eval()

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(itertools.chain(self.module.parameters(), self.module.buffers()))

    def expected_inputs(self) -> str:
        return _first_layer_inputs(self.module)

    def _run(self, inputs: tuple[Any, ...], input_names: Sequence[str] | None) -> Any:
        return self.module(*(_on_device(value, self.device) for value in inputs))


class TorchModulePredictor(_ModulePredictor):
    """An eager ``nn.Module``."""

    runtime = "torch"


class TorchScriptPredictor(_ModulePredictor):
    """A TorchScript module loaded with ``torch.jit.load``."""

    runtime = "torchscript"


class ExportedProgramPredictor(Predictor):
    """A ``torch.export`` program (``.pt2``) loaded with ``torch.export.load``."""

    runtime = "torch.export"

    def __init__(self, program: Any, device: str = "cpu") -> None:
        super().__init__(device)
        self.program = program
        module = program.module()
        self.module = module.to(self.device) if self.device.type != "cpu" else module
        self._user_inputs = list(program.graph_signature.user_inputs)

    @property
    def nbytes(self) -> int:
        tensors = [*self.program.state_dict.values(), *self.program.constants.values()]
        return _tensor_bytes(t for t in tensors if isinstance(t, torch.Tensor))

    def input_count(self) -> int | None:
        return len(self._user_inputs)

    def expected_inputs(self) -> str:
        shapes = {}
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in self._user_inputs:
                value = node.meta.get("val")
                if isinstance(value, torch.Tensor):
                    dims = [str(d) if isinstance(d, int) else "N" for d in value.shape]
                    dtype = str(value.dtype).removeprefix("torch.")
                    shapes[node.name] = f"'{node.name}' ({', '.join(dims)}) {dtype}"
        return "; ".join(shapes.get(name, repr(name)) for name in self._user_inputs)

    def _run(self, inputs: tuple[Any, ...], input_names: Sequence[str] | None) -> Any:
        return self.module(*(_on_device(value, self.device) for value in inputs))


_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def onnx_session_options(onnxruntime: Any, num_threads: int | None) -> Any:
    """ONNX Runtime session options for ``num_threads`` threads (its default when None).

    With more than one thread, the pool's threads do not spin between runs: they would keep
    cores busy while the task decodes the next batch or runs another model."""
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if num_threads is None or num_threads > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxPredictor(Predictor):
    """An ONNX model run by ONNX Runtime on the CPU."""

    runtime = "onnx"

    def __init__(self, model: str | bytes, *, nbytes: int, num_threads: int | None = None) -> None:
        super().__init__("cpu")
        onnxruntime = import_onnxruntime()
        options = onnx_session_options(onnxruntime, num_threads)
        self.session = onnxruntime.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {arg.name: arg for arg in self.session.get_inputs()}
        self._output_names = [arg.name for arg in self.session.get_outputs()]
        self._nbytes = nbytes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self._inputs)

    def input_count(self) -> int | None:
        return len(self._inputs)

    def expected_inputs(self) -> str:
        parts = []
        for arg in self._inputs.values():
            dims = ", ".join(d if isinstance(d, str) else str(d) for d in arg.shape)
            parts.append(f"'{arg.name}' ({dims}) {arg.type.removeprefix('tensor(')[:-1]}")
        return "; ".join(parts)

    def check_input_names(self, input_names: Sequence[str] | None) -> None:
        if not input_names:
            return
        unknown = [name for name in input_names if name not in self._inputs]
        if unknown or len(set(input_names)) != len(self._inputs):
            raise ModelInputError(
                f"input_names={list(input_names)!r} do not match the ONNX model's inputs: "
                f"{self.expected_inputs()}"
                + (f" (unknown: {unknown!r})" if unknown else " (each input exactly once)")
            )

    def _run(self, inputs: tuple[Any, ...], input_names: Sequence[str] | None) -> Any:
        self.check_input_names(input_names)
        names = tuple(input_names) if input_names else tuple(self._inputs)
        tensors = [tensor for _, tensor in input_leaves(inputs)]
        feed = {}
        for name, tensor in zip(names, tensors, strict=True):
            dtype = _ONNX_DTYPES.get(self._inputs[name].type)
            array = tensor.numpy(force=True)
            feed[name] = array if dtype is None else array.astype(dtype, copy=False)
        arrays = self.session.run(self._output_names, feed)
        if len(arrays) == 1:
            return arrays[0]
        return dict(zip(self._output_names, arrays, strict=True))
