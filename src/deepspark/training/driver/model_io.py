"""The model in and out of an `Estimator`: weights, optimizer state, exports, save and load.

Driver side. `Estimator` inherits `ModelIO`, so these are ordinary estimator methods
(``est.state_dict()``, ``ds.Estimator.load(path)``); they live here to keep training and
inference (``estimator.py``) apart from moving the model in and out.

The optimizer state: each `fit` brings back, besides the weights, the state of its optimizers
(Adam's moments and step counts, momentum buffers, the learning rates), and the next `fit` of
the same estimator starts its optimizers from it, so that two fits of 3 epochs continue each
other like one fit of 6. `save` writes it and `load` restores it; `reset_optimizer` drops it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from deepspark.training.driver.estimator import Estimator

__all__ = ["ModelIO", "class_or_instance_load"]


class class_or_instance_load:
    """`load` for both habits: ``Estimator.load(path)`` builds an estimator, while
    ``est.load(path)`` (Orca's habit) loads the saved estimator into ``est`` and returns it.

    Without this, the instance call would run the class method and leave ``est`` untrained.
    The instance call takes everything the saved estimator holds (model, weights, optimizer
    state, loss, metrics, history); a saved estimator of another kind (a ``.keras`` file into
    a torch estimator) is refused with the call that gives it.
    """

    def __init__(self, load: Callable[..., Any]):
        self._load = load
        functools.update_wrapper(self, load)

        @functools.wraps(load)
        def load_into(estimator: Any, path: str, **options: Any) -> Any:
            loaded = load(type(estimator), path, **options)
            if type(loaded) is not type(estimator):
                raise TypeError(
                    f"{path} holds a {type(loaded).__name__}, which cannot be loaded into this "
                    f"{type(estimator).__name__}; use est = ds.Estimator.load({path!r})"
                )
            vars(estimator).clear()
            vars(estimator).update(vars(loaded))
            return estimator

        self._load_into = load_into

    def __get__(self, instance: Any, owner: type) -> Callable[..., Any]:
        # bound methods keep the name, signature and docstring of `load` for help()
        if instance is None:
            return types.MethodType(self._load, owner)
        return types.MethodType(self._load_into, instance)


class ModelIO:
    """The estimator's methods that move its model in and out (see `Estimator`)."""

    _model: nn.Module
    _optimizer_factory: Any
    # The last fit's optimizer state (bytes of deepspark.persist.optimizer_state), which the
    # next fit continues from; None before a fit and after reset_optimizer().
    _optimizer_state: bytes | None = None

    # --- the model and its weights -----------------------------------------------------------

    def get_model(self) -> nn.Module:
        """The driver's model; after `fit` it holds the trained weights.

        An estimator loaded from a TorchScript file or a ``.pt2`` program holds a
        `deepspark.persist.programs.ProgramModule` that runs it (``.module`` is the loaded
        module).
        """
        return self._model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the model's weights: a state dict that later fits leave as it is.

        The optimizer state is separate: the next `fit` continues from the last fit's (see
        `reset_optimizer`), whatever weights `load_state_dict` puts in.

        Examples
        --------
        >>> import torch, deepspark as ds
        >>> est = ds.Estimator.from_torch(torch.nn.Linear(4, 2))
        >>> sorted(est.state_dict())
        ['bias', 'weight']
        """
        return {name: tensor.detach().clone() for name, tensor in self._model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Put weights into the model, as ``nn.Module.load_state_dict`` does.

        Parameters
        ----------
        state : dict of str to Tensor
            From `state_dict`, ``model.state_dict()`` of the same architecture, or
            ``deepspark.persist.weights.load_model_weights(path)``.
        strict : bool
            Refuse missing and unexpected names.

        Returns
        -------
        NamedTuple
            ``missing_keys`` and ``unexpected_keys``, as torch returns them.

        Examples
        --------
        >>> import torch, deepspark as ds
        >>> est = ds.Estimator.from_torch(torch.nn.Linear(4, 2))
        >>> est.load_state_dict({"weight": torch.zeros(2, 4), "bias": torch.ones(2)})
        <All keys matched successfully>
        >>> est.get_model()(torch.ones(1, 4)).tolist()
        [[1.0, 1.0]]
        """
        return self._model.load_state_dict(state, strict=strict)

    # --- the optimizer state -----------------------------------------------------------------

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        """The optimizer state the next `fit` starts from, or ``None`` (a fresh optimizer).

        One optimizer's ``state_dict()``; for several (or one with fp16's gradient scaler),
        ``{"0": ..., "1": ...}`` in order, as checkpoints store them. Tensors are on the CPU.

        Examples
        --------
        >>> import torch, deepspark as ds
        >>> ds.Estimator.from_torch(torch.nn.Linear(4, 2)).optimizer_state_dict() is None
        True
        """
        from deepspark.persist.optimizer_state import optimizer_state_from_bytes

        if self._optimizer_state is None:
            return None
        return optimizer_state_from_bytes(self._optimizer_state)

    def reset_optimizer(self) -> None:
        """Forget the last fit's optimizer state: the next `fit` builds fresh optimizers.

        Needed when the optimizer factory now builds other optimizers than the last fit's (a
        different count, other parameter groups, frozen layers left out); the weights stay.
        """
        self._optimizer_state = None

    def _carried_optimizer_state(self) -> bytes | None:
        """The last fit's optimizer state for the next fit, once it fits that fit's optimizers.

        Checked on the driver before any job: the optimizer factory is called on the driver's
        model (as the dry run does) and the optimizers' parameter groups compared with the
        saved ones, read without their tensors.
        """
        from deepspark.persist.optimizer_state import (
            check_layout,
            optimizer_layout,
            optimizer_state_from_bytes,
            optimizer_state_layout,
        )
        from deepspark.training.rank.step import takes_model

        if self._optimizer_state is None:
            return None
        factory = self._optimizer_factory
        model = self._model
        built = factory(model) if takes_model(factory) else factory(model.parameters())
        optimizers = list(built) if isinstance(built, (list, tuple)) else [built]
        saved = optimizer_state_from_bytes(self._optimizer_state, map_location="meta")
        check_layout(optimizer_state_layout(saved), optimizer_layout(optimizers))
        return self._optimizer_state

    # --- export -------------------------------------------------------------------------------

    def export_onnx(self, path: str, sample: Any, **options: Any) -> str:
        """Export the model to ONNX and check it in onnxruntime against torch on `sample`.

        See `deepspark.inference.export_onnx` for the options (input names, dynamic batch,
        tolerance). Needs the ``onnx`` extra: ``pip install deepspark[onnx]``.
        """
        from deepspark.inference import export_onnx

        return export_onnx(self._model, path, sample, **options)

    def export_torchscript(self, path: str, sample: Any, **options: Any) -> str:
        """Export the model to TorchScript and check the file against torch on `sample`."""
        from deepspark.inference import export_torchscript

        return export_torchscript(self._model, path, sample, **options)

    def export_program(self, path: str, sample: Any, **options: Any) -> str:
        """Export the model as a `torch.export` program (``.pt2``), checked against torch."""
        from deepspark.inference import export_program

        return export_program(self._model, path, sample, **options)

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Save the estimator at an fsspec URL: safetensors weights, the optimizer state, JSON
        metadata, pickled code.

        The architecture, loss, optimizer factory, metrics and custom steps are stored with
        cloudpickle: load only directories you trust, since unpickling runs code. The optimizer
        state (``optimizer.pt``, tensors and plain values only) lets a loaded estimator's
        `fit` continue where the last one stopped.
        """
        from deepspark.persist.estimator_dir import save_estimator

        return save_estimator(self, path)

    @class_or_instance_load
    def load(cls, path: str, *, metrics: Sequence[Any] | None = None) -> Estimator:
        """Load an estimator: a directory written by `save`, or a TorchScript / ``.pt2`` file.

        ``ds.Estimator.load(path)`` returns a new estimator. Called on an estimator, as Orca's
        ``est.load(path)``, it loads into that estimator and returns it: its model, weights,
        optimizer state, loss and metrics become the saved ones.

        Parameters
        ----------
        path : str
            Local path or fsspec URL of a `save` directory (trusted directories only: it
            unpickles code), or of a file written by `export_torchscript` (``torch.jit.save``)
            or `export_program` (``torch.export.save``, ``.pt2``). A file needs none of the
            model's Python classes and gives an estimator for inference: `predict`, and
            `evaluate` with `metrics`; `fit` refuses. A ``.keras`` file (or a directory of
            ``KerasEstimator.save``) gives a ``deepspark.keras.KerasEstimator``.
        metrics : list, optional
            Metrics for `evaluate` (as in `from_torch`); for a `save` directory they replace
            the saved ones.

        Returns
        -------
        Estimator
            With a saved directory's optimizer state, so that `fit` continues training (the
            estimator it was called on, for ``est.load(path)``).

        Examples
        --------
        >>> import os, tempfile, torch, deepspark as ds
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.pt2")
        >>> program = torch.export.export(torch.nn.Linear(4, 2), (torch.ones(2, 4),))
        >>> torch.export.save(program, path)
        >>> est = ds.Estimator.load(path, metrics=["mse"])
        >>> tuple(est.get_model()(torch.ones(2, 4)).shape), est.metrics
        ((2, 2), ['mse'])
        """
        import fsspec

        from deepspark.inference import ModelKind, ModelSource
        from deepspark.persist.estimator_dir import load_estimator
        from deepspark.persist.programs import ProgramKind, ProgramModule

        fs, root = fsspec.core.url_to_fs(path)
        is_keras = root.endswith(".keras") or fs.exists(f"{root.rstrip('/')}/model.keras")
        if is_keras:  # the Keras capability's own format (the one upward import, lazily)
            from deepspark.keras.keras_estimator import KerasEstimator

            return KerasEstimator.load(path, metrics=metrics)
        if fs.isdir(root):
            return load_estimator(cls, path, metrics=metrics)
        kind = ModelSource.from_path(path).kind
        if kind is ModelKind.ONNX:
            raise ValueError(
                f"{path} is an ONNX model, which torch cannot run as a module; predict with it "
                "through ds.predict(df, path, ...), or load its TorchScript or .pt2 export"
            )
        model = ProgramModule.load(path, ProgramKind(kind.value))
        return cls.from_torch(model, metrics=metrics)  # type: ignore[attr-defined]
