"""TorchScript files and ``torch.export`` programs as an `nn.Module` that pickles (no pyspark).

A model loaded from a TorchScript file (``torch.jit.load``) or from a ``.pt2`` program
(``torch.export.load(...).module()``) runs without the Python classes it was written with, but
neither pickles: TorchScript modules have no ``__getstate__``, and an exported program's module
holds compiler state that cloudpickle refuses. Its ``train()`` and ``eval()`` also raise. So
`ProgramModule` wraps either one: it pickles as the program's own archive (TorchScript's zip,
or the ``.pt2`` with the module's current weights), which a Spark task turns back into a
`ProgramModule` without any of the user's classes, and its ``train()`` / ``eval()`` leave an
exported program alone (it runs as it was exported: in eval mode, when `export_program`
exported it).

Loading runs no Python code beyond torch's own loaders: TorchScript archives hold TorchScript,
``.pt2`` archives a graph of torch operators.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

import fsspec
import torch
from torch import nn

__all__ = ["ProgramKind", "ProgramModule"]


class ProgramKind(str, Enum):
    """How a program is stored: the two archives torch loads without Python classes."""

    TORCHSCRIPT = "torchscript"  # torch.jit.save
    TORCH_EXPORT = "torch_export"  # torch.export.save (.pt2)


class ProgramModule(nn.Module):
    """A TorchScript module or a ``torch.export`` program, as a picklable `nn.Module`.

    Calls, ``state_dict()`` and ``load_state_dict()`` go to the program's module, so the state
    dict has the names of the original model's. Pickling stores the archive with the current
    weights.

    Parameters
    ----------
    module : nn.Module
        A ``torch.jit.ScriptModule``, or ``program.module()`` of an exported program.
    program : torch.export.ExportedProgram, optional
        The exported program ``module`` came from (``None`` for TorchScript).

    Examples
    --------
    >>> import io, pickle, torch
    >>> buffer = io.BytesIO()
    >>> torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.ones(2, 3),)), buffer)
    >>> model = ProgramModule.from_bytes(buffer.getvalue(), ProgramKind.TORCH_EXPORT)
    >>> tuple(pickle.loads(pickle.dumps(model))(torch.ones(2, 3)).shape)
    (2, 2)
    """

    def __init__(self, module: nn.Module, program: Any = None) -> None:
        super().__init__()
        self.module = module
        self.program = program
        self.kind = ProgramKind.TORCHSCRIPT if program is None else ProgramKind.TORCH_EXPORT

    @classmethod
    def from_bytes(cls, data: bytes, kind: ProgramKind | str) -> ProgramModule:
        """Load a TorchScript archive or a ``.pt2`` program from its bytes (on the CPU)."""
        if ProgramKind(kind) is ProgramKind.TORCHSCRIPT:
            with _torchscript_warnings_silenced():
                return cls(torch.jit.load(io.BytesIO(data), map_location="cpu"))
        program = torch.export.load(io.BytesIO(data))
        return cls(program.module(), program)

    @classmethod
    def load(cls, path: str, kind: ProgramKind | str) -> ProgramModule:
        """Load a TorchScript file or a ``.pt2`` program at a local path or fsspec URL."""
        with fsspec.open(path, "rb") as file:
            return cls.from_bytes(file.read(), kind)

    def to_bytes(self) -> bytes:
        """The program's archive, with the module's current weights."""
        buffer = io.BytesIO()
        if self.kind is ProgramKind.TORCHSCRIPT:
            with _torchscript_warnings_silenced():
                torch.jit.save(self.module, buffer)
        else:
            torch.export.save(self._program_with_current_weights(), buffer)
        return buffer.getvalue()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> ProgramModule:
        self.training = mode
        if self.kind is ProgramKind.TORCHSCRIPT:  # an exported program has no modes
            self.module.train(mode)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProgramModule.from_bytes, (self.to_bytes(), self.kind.value))

    def _program_with_current_weights(self) -> Any:
        """The exported program holding the module's weights.

        ``program.module()`` shares the program's tensors, so ``load_state_dict`` (which copies
        in place) changes both; a move to another device or ``assign=True`` does not, so the
        module's values are copied back where they differ.
        """
        saved = self.program.state_dict
        with torch.no_grad():
            for name, tensor in self.module.state_dict().items():
                target = saved.get(name)
                if isinstance(target, torch.Tensor) and target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)
        return self.program


@contextlib.contextmanager
def _torchscript_warnings_silenced() -> Iterator[None]:
    # torch deprecates torch.jit in favour of torch.export; TorchScript files stay supported
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield
