"""One training step of a rank: precision, gradient accumulation, clipping, optimizers.

`StepRunner` owns what a step touches besides the data: the optimizers and schedulers the
user's factories build, the autocast dtype and gradient scaler, the micro-steps accumulated
since the last optimizer step, and a user's own ``train_step`` / ``eval_step``. The epoch loop
(`loop.EpochRunner`) hands it one batch at a time. No pyspark here (DESIGN decision 12).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
from torch import nn

from deepspark.persist.optimizer_state import load_optimizer_state
from deepspark.training.job_spec import TrainSpec
from deepspark.training.rank.structure import map_tensors, take_rows, to_device

__all__ = [
    "PRECISIONS",
    "OptimizerGroup",
    "StepRunner",
    "build_optimizers",
    "loss_target",
    "takes_model",
]

PRECISIONS = ("fp32", "bf16", "fp16")


def loss_target(labels: Any) -> Any:
    """What the loss receives: the one label tensor, or the tuple (dict) of several."""
    if isinstance(labels, tuple) and len(labels) == 1:
        return labels[0]
    return labels


def _as_list(value: Any, what: str, kind: type) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{what} returned {type(item).__name__}, not a {kind.__name__}")
    return items


def takes_model(factory: Any) -> bool:
    """A factory whose single parameter is named ``model`` gets the module, not its params."""
    try:
        names = list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return False
    return names[:1] == ["model"]


def build_optimizers(spec: TrainSpec, model: nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers of ``spec``'s factory: ``params -> Optimizer``, or ``model -> [...]``."""
    if spec.program.optimizer_blob is None:
        raise ValueError(
            "fit needs an optimizer: pass optimizer=lambda params: torch.optim.Adam(params)"
        )
    factory = cloudpickle.loads(spec.program.optimizer_blob)
    built = factory(model) if takes_model(factory) else factory(model.parameters())
    return _as_list(built, "optimizer(...)", torch.optim.Optimizer)


def _build_schedulers(spec: TrainSpec, optimizers: list[torch.optim.Optimizer]) -> list[Any]:
    if spec.program.scheduler_blob is None:
        return []
    factory = cloudpickle.loads(spec.program.scheduler_blob)
    built = factory(optimizers[0] if len(optimizers) == 1 else optimizers)
    return list(built) if isinstance(built, (list, tuple)) else [built]


class OptimizerGroup:
    """Several optimizers (and a gradient scaler) as one object with a state dict.

    Checkpoints save and restore it as they do one optimizer; a single optimizer without a
    scaler is checkpointed as itself, so its checkpoints stay readable by plain PyTorch.
    """

    def __init__(self, items: list[Any]):
        self.items = items

    def state_dict(self) -> dict[str, Any]:
        return {str(index): item.state_dict() for index, item in enumerate(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.items):
            raise ValueError(
                f"the checkpoint holds {len(state)} optimizer/scheduler states, this fit has "
                f"{len(self.items)}; resume with the same optimizer and scheduler factories"
            )
        for index, item in enumerate(self.items):
            item.load_state_dict(state[str(index)])


def _checkpointable(items: list[Any]) -> Any:
    if not items:
        return None
    return items[0] if len(items) == 1 else OptimizerGroup(items)


def average_gradients(parameters: list[torch.Tensor], world_size: int) -> None:
    """Mean of every parameter's gradient over the ranks, in one all-reduce.

    A parameter without a gradient counts as zeros on that rank, so every rank sends the same
    shapes whatever its batch touched.
    """
    if world_size == 1 or not parameters:
        return
    grads = [
        param.grad if param.grad is not None else torch.zeros_like(param) for param in parameters
    ]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for param, grad in zip(parameters, grads, strict=True):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(param).clone()
        offset += count


class SyncedOptimizer:
    """What a custom ``train_step`` steps: the optimizer, averaging gradients over the ranks
    right before each ``step()`` (the model is not wrapped in DDP there, so any forward works:
    a GAN's generator alone, several losses, several backward passes)."""

    def __init__(self, optimizer: torch.optim.Optimizer, world_size: int):
        self.optimizer = optimizer
        self._world = world_size

    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        average_gradients(params, self._world)
        return self.optimizer.step(closure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def _zero_loss(outputs: Any) -> torch.Tensor:
    """A zero that still reaches every output, so a filler step joins DDP's all-reduce."""
    parts: list[torch.Tensor] = []
    map_tensors(outputs, lambda t: parts.append(t.sum() * 0.0) if t.is_floating_point() else None)
    if not parts:
        raise ValueError("the model returned no floating-point tensor to train")
    return torch.stack(parts).sum()


class StepRunner:
    """Runs the training and evaluation steps of one rank."""

    def __init__(
        self,
        spec: TrainSpec,
        model: nn.Module,
        ddp: nn.Module,
        device: torch.device,
        train: bool = True,
    ):
        self.spec = spec
        self.model = model
        self.ddp = ddp
        self.device = device
        self.world = spec.world_size
        self.loss_fn = _loaded(spec.program.loss_blob)
        self.collate = _loaded(spec.program.collate_blob)
        self.custom_train = (
            cloudpickle.loads(spec.program.train_step_blob)
            if spec.program.train_step_blob
            else None
        )
        self.custom_eval = (
            cloudpickle.loads(spec.program.eval_step_blob) if spec.program.eval_step_blob else None
        )
        self.optimizers = build_optimizers(spec, model) if train else []
        if train and spec.program.optimizer_state_blob is not None:  # the last fit's, continued
            load_optimizer_state(spec.program.optimizer_state_blob, self.optimizers)
        self.schedulers = _build_schedulers(spec, self.optimizers) if train else []
        self.accumulate = max(1, int(spec.loop.accumulate_steps))
        self.pending = 0  # micro-steps whose gradients wait for the next optimizer step
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            spec.loop.precision
        )
        self.scaler = None
        if spec.loop.precision == "fp16":
            if device.type != "cuda":
                raise ValueError(
                    'precision="fp16" needs a GPU (use_gpu=True); on CPU use precision="bf16"'
                )
            self.scaler = torch.amp.GradScaler("cuda")
        self._synced = [SyncedOptimizer(opt, self.world) for opt in self.optimizers]
        self.labels: tuple[Any, ...] = ()  # the last batch's labels, on the device

    # --- what checkpoints save --------------------------------------------------------------

    @property
    def optimizer_state(self) -> Any:
        return _checkpointable(self.optimizers + ([self.scaler] if self.scaler else []))

    @property
    def scheduler_state(self) -> Any:
        return _checkpointable(self.schedulers)

    # --- the batch --------------------------------------------------------------------------

    def prepare(self, batch) -> tuple[Any, Any, int]:
        """(features, labels, real rows) on the device, through the user's collate hook."""
        features = to_device(batch.features, self.device)
        labels = to_device(batch.labels, self.device)
        if self.collate is not None:
            features, labels = self.collate(features, labels)
            features = features if isinstance(features, tuple) else (features,)
            labels = labels if isinstance(labels, tuple) else (labels,)
        self.labels = labels  # what the metrics compare the outputs with
        return features, labels, batch.num_real

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- training ---------------------------------------------------------------------------

    def train(self, batch, global_real: int) -> tuple[Any, int, Any, dict[str, Any]]:
        """One step on ``batch``; returns (loss x real rows, real rows, outputs, extra values).

        ``global_real`` is the step's real rows over every rank: scaling this rank's mean loss
        by its share makes the gradient DDP averages the exact mean over every real row.
        """
        features, labels, real = self.prepare(batch)
        if self.custom_train is not None:
            return self._custom_train(features, labels, real)
        boundary = self.pending + 1 >= self.accumulate
        unwrapped = self.ddp is self.model  # one rank: nothing to hold back
        sync = contextlib.nullcontext() if boundary or unwrapped else self.ddp.no_sync()
        loss_rows: Any = 0.0
        with sync:
            with self._autocast():
                outputs = self.ddp(*features)
                if real > 0:
                    real_outputs = take_rows(outputs, real)
                    loss = self.loss_fn(real_outputs, loss_target(take_rows(labels, real)))
                    scaled = loss * (real * self.world / max(global_real, 1)) / self.accumulate
                    loss_rows = loss.detach().float() * real
                else:  # filler step: zero gradient, but every collective joined
                    real_outputs = None
                    scaled = _zero_loss(outputs)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        self.pending += 1
        if boundary:
            self._optimizer_step()
        return loss_rows, real, real_outputs, {}

    def flush(self) -> None:
        """Apply gradients still accumulated at the end of an epoch (or at max_steps)."""
        if self.pending and self.custom_train is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            average_gradients(params, self.world)  # the micro-steps ran under no_sync
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        if self.spec.loop.clip_grad_norm is not None:
            if self.scaler is not None:
                for optimizer in self.optimizers:
                    self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.loop.clip_grad_norm)
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        if self.spec.program.scheduler_interval == "step":
            for scheduler in self.schedulers:
                if not _is_plateau(scheduler):
                    scheduler.step()

    def _custom_train(self, features, labels, real: int):
        batch = (_collapse(take_rows(features, real)), _collapse(take_rows(labels, real)))
        optimizers = self._synced[0] if len(self._synced) == 1 else list(self._synced)
        with self._autocast():
            result = self.custom_train(self.model, batch, optimizers, self.loss_fn)
        values = _step_values(result, "train_step")
        loss = values.pop("loss")
        return loss * real, real, None, {name: value * real for name, value in values.items()}

    def learning_rates(self) -> dict[str, float]:
        """``lr`` of the first optimizer's first parameter group, ``lr_1``... of the others."""
        rates = {}
        for index, optimizer in enumerate(self.optimizers):
            rates["lr" if index == 0 else f"lr_{index}"] = float(optimizer.param_groups[0]["lr"])
        return rates

    def end_of_epoch(self, record: dict[str, Any]) -> None:
        """Step epoch-wise schedulers; ``ReduceLROnPlateau`` reads the record's monitor."""
        for scheduler in self.schedulers:
            if _is_plateau(scheduler):
                monitor = self.spec.program.scheduler_monitor or (
                    "val_loss" if self.spec.has_validation else "train_loss"
                )
                if monitor not in record:
                    known = ", ".join(sorted(k for k in record if k not in ("epoch", "steps")))
                    raise ValueError(
                        f"scheduler_monitor={monitor!r} is not in the epoch's values ({known})"
                    )
                scheduler.step(record[monitor])
            elif self.spec.program.scheduler_interval == "epoch":
                scheduler.step()

    # --- evaluation -------------------------------------------------------------------------

    def evaluate(self, batch) -> tuple[Any, int, dict[str, Any]]:
        """(outputs or None, rows, {name: value x rows}) of one evaluation batch."""
        features, labels, real = self.prepare(batch)
        with self._autocast():
            if self.custom_eval is not None:
                pair = (_collapse(take_rows(features, real)), _collapse(take_rows(labels, real)))
                values = _step_values(
                    self.custom_eval(self.model, pair, self.loss_fn), "eval_step", need_loss=False
                )
                outputs = values.pop("outputs", None)
                return outputs, real, {name: value * real for name, value in values.items()}
            outputs = self.model(*features)
            values = {}
            if self.loss_fn is not None:
                loss = self.loss_fn(outputs, loss_target(labels))
                values["loss"] = float(loss) * real
            return outputs, real, values


def _loaded(blob: bytes | None) -> Any:
    return cloudpickle.loads(blob) if blob else None


def _collapse(values: tuple[Any, ...]) -> Any:
    return values[0] if len(values) == 1 else values


def _is_plateau(scheduler: Any) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _step_values(result: Any, what: str, need_loss: bool = True) -> dict[str, Any]:
    """A custom step's dict of row-mean values, as floats (``outputs`` kept as it is)."""
    if isinstance(result, torch.Tensor) and result.dim() == 0:
        result = {"loss": result}
    if not isinstance(result, dict) or (need_loss and "loss" not in result):
        raise TypeError(
            f"{what} must return a dict of row-mean values with a 'loss' key, e.g. "
            f"{{'loss': loss, 'd_loss': d_loss}}; got {type(result).__name__}"
        )
    values: dict[str, Any] = {}
    for name, value in result.items():
        if name == "outputs":
            values[name] = value
            continue
        try:
            values[name] = float(value.detach() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} returned {name}={value!r}, which is not a number") from None
    return values
