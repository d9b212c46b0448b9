"""The epoch loop of one rank: DDP training with exact global-batch losses, and evaluation.

`EpochRunner` walks the epochs and their steps: where each epoch's batches come from (the
streamed first epoch, or the spill), the step and epoch limits, validation and checkpoints at
epoch ends or every N steps, a resume in the middle of an epoch, callbacks and their shared
decision to stop. What one step does is `step.StepRunner`'s. No pyspark here (DESIGN
decision 12).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
from torch import nn

from deepspark.training.job_spec import VALIDATION_SPLIT, TrainSpec
from deepspark.training.rank.step import StepRunner

__all__ = ["EpochRunner", "build_model"]

_log = logging.getLogger(__name__)

# Rank 0 sends a progress event at most this often, so the channel never slows training.
PROGRESS_INTERVAL_S = 0.5


def build_model(spec: TrainSpec) -> nn.Module:
    model = cloudpickle.loads(spec.program.model_blob)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the job's model is a {type(model).__name__}, not an nn.Module")
    return model


@dataclass
class _Position:
    """Where training stands: the epoch to run, the steps of it already done, and so on."""

    epoch: int = 0
    step: int = 0  # steps of `epoch` done before this attempt (a resume mid-epoch)
    global_step: int = 0  # steps over the whole fit
    loss_sum: float = 0.0  # of the steps of `epoch` done before this attempt
    loss_rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


class EpochRunner:
    """Runs epochs for one rank; every rank runs the same number of steps and collectives."""

    def __init__(
        self, spec: TrainSpec, model: nn.Module, device: torch.device, rank: int, progress
    ):
        from deepspark.training.rank.metric_routing import build_metrics

        self.spec = spec
        self.model = model
        self.device = device
        self.rank = rank
        self.progress = progress
        metric_defs = cloudpickle.loads(spec.program.metrics_blob)
        self.metric_defs = metric_defs
        self.val_metrics = build_metrics(metric_defs, device)
        self.train_metrics = build_metrics(metric_defs, device)
        self.callbacks = cloudpickle.loads(spec.callbacks_blob) if spec.callbacks_blob else []
        # the per-step hook runs only for callbacks that define it: its state and the batch
        # loss (a host sync) every step cost more than a small model's step
        self.batch_callbacks = [c for c in self.callbacks if _defines(c, "on_batch_end")]
        self.ddp: nn.Module | None = None
        self.steps: StepRunner | None = None
        # validation every N steps: one record per validation, besides the epoch records
        self.step_history: list[dict[str, Any]] = []
        # wall-clock moments for the fit's timeline: first step done, training done, and the
        # seconds spent in validation
        self.marks: dict[str, float] = {"validation_s": 0.0}

    # --- training ---------------------------------------------------------------------------

    def fit(self, source) -> list[dict[str, Any]]:
        """Train every epoch; ``source`` is the rank's input (see `rank.sources`)."""
        from torch.nn.parallel import DistributedDataParallel

        spec = self.spec
        self.source = source
        if spec.program.train_step_blob is None and spec.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        else:  # one rank has no gradient to average; a custom step averages its own
            self.ddp = self.model
        self.steps = StepRunner(spec, self.model, self.ddp, self.device)
        position = self._restore()
        history = position.history
        self.marks["model_ready"] = time.time()
        self._callbacks("on_train_begin", epoch=position.epoch, step=0, logs={})
        epoch = position.epoch
        while epoch < spec.loop.epochs and not position.stopped:
            if spec.loop.max_steps is not None and position.global_step >= spec.loop.max_steps:
                break
            self._callbacks("on_epoch_begin", epoch=epoch, step=position.step, logs={})
            batches, steps = self._epoch_batches(source, epoch, position.step)
            record = self._train_epoch(batches, steps, epoch, position)
            if spec.has_validation:
                record.update({f"val_{k}": v for k, v in self._validate().items()})
            self.steps.end_of_epoch(record)
            history.append(record)
            if self.rank == 0 and self.progress is not None:
                self.progress.send({"kind": "epoch", "epoch": epoch, "metrics": record})
            state = self._callbacks("on_epoch_end", epoch=epoch, step=record["steps"], logs=record)
            position.stopped = state is not None and self._any_rank(state.stop_training)
            last = (
                epoch + 1 == spec.loop.epochs
                or position.stopped
                or (spec.loop.max_steps is not None and position.global_step >= spec.loop.max_steps)
            )
            if (epoch + 1) % spec.recovery.checkpoint_every == 0 or last:
                self._checkpoint(epoch, position, mid_epoch=False)
            epoch += 1
            position.step, position.loss_sum, position.loss_rows = 0, 0.0, 0
        self.marks["train_done"] = time.time()
        self._callbacks(
            "on_train_end", epoch=spec.loop.epochs, step=0, logs=history[-1] if history else {}
        )
        return history

    def _restore(self) -> _Position:
        """The position of a resumed run, from the latest checkpoint (epoch end or step)."""
        from deepspark.training.rank.checkpoint import latest_checkpoint, load_checkpoint

        spec = self.spec
        position = _Position()
        if not (spec.recovery.checkpoint_dir and spec.recovery.resume):
            return position
        info = latest_checkpoint(spec.recovery.checkpoint_dir)
        if info is None:
            return position
        assert self.steps is not None
        restored = load_checkpoint(
            info, self.model, self.steps.optimizer_state, self.steps.scheduler_state
        )
        extra = restored.get("extra") or {}
        position.history = list(extra.get("history", []))
        position.global_step = int(extra.get("global_step", 0)) or sum(
            int(record.get("steps", 0)) for record in position.history
        )
        position.stopped = bool(extra.get("stopped"))
        if extra.get("step") is not None:  # saved in the middle of this epoch
            position.epoch = int(restored["epoch"])
            position.step = int(extra["step"])
            if self.rank == 0:  # the sums are over every rank: counted once, here
                position.loss_sum = float(extra.get("loss_sum", 0.0))
                position.loss_rows = int(extra.get("loss_rows", 0))
        else:
            position.epoch = int(restored["epoch"]) + 1
        if self.rank == 0:
            _log.info("resuming from %s at epoch %d step %d", info, position.epoch, position.step)
        return position

    def _checkpoint(self, epoch: int, position: _Position, *, mid_epoch: bool) -> None:
        """Rank 0 saves the model, optimizers, schedulers and where training stands."""
        from deepspark.training.rank.checkpoint import save_checkpoint

        if self.rank != 0 or not self.spec.recovery.checkpoint_dir:
            return
        assert self.steps is not None
        extra: dict[str, Any] = {
            "history": position.history,
            "stopped": position.stopped,
            "global_step": position.global_step,
        }
        if mid_epoch:
            extra.update(
                step=position.step, loss_sum=position.loss_sum, loss_rows=position.loss_rows
            )
        save_checkpoint(
            self.spec.recovery.checkpoint_dir,
            epoch,
            self.model,
            self.steps.optimizer_state,
            self.steps.scheduler_state,
            extra=extra,
        )

    def _epoch_batches(self, source, epoch: int, start: int):
        """(batch, global real rows) pairs of ``epoch`` from step ``start``, and its steps
        (``None`` while the first epoch streams in), within ``steps_per_epoch``."""
        limit = self.spec.loop.steps_per_epoch
        batches, steps = source.epoch(epoch, start, self.device)
        if limit is not None:
            steps = limit if steps is None else min(steps, limit)
        if steps is not None:
            batches = itertools.islice(batches, max(0, steps - start))
        return batches, steps

    def _train_epoch(self, batches, steps: int | None, epoch: int, position: _Position):
        """One epoch; ``steps`` is its step count when known (``None`` while streaming)."""
        assert self.steps is not None
        spec, rank = self.spec, self.rank
        self.ddp.train()
        for metric in self.train_metrics:
            metric.reset()
        loss_sum: Any = position.loss_sum  # sum of per-row losses on this rank
        loss_rows = position.loss_rows
        extra_sums: dict[str, float] = {}
        started = time.perf_counter()
        last_report = -math.inf  # report the first step at once: it marks time-to-first-step
        rows_done = 0  # global real rows so far, for the progress rate
        step = position.step
        for batch, global_real in batches:
            rows_done += global_real
            loss_part, real, outputs, extra = self.steps.train(batch, global_real)
            loss_sum = loss_sum + loss_part  # summed on the device: no host sync per step
            loss_rows += real
            for name, value in extra.items():
                extra_sums[name] = extra_sums.get(name, 0.0) + value
            if outputs is not None and self.train_metrics:
                with torch.no_grad():
                    _update_metrics(self.train_metrics, outputs, self.steps.labels, real)
            step += 1
            position.global_step += 1
            if "first_step" not in self.marks:
                self.marks["first_step"] = time.time()
            if self.batch_callbacks:
                self._callbacks(
                    "on_batch_end",
                    epoch=epoch,
                    step=step - 1,
                    logs={"loss": float(loss_part) / max(real, 1)},
                    only=self.batch_callbacks,
                )
            now = time.perf_counter()
            if rank == 0 and self.progress is not None and now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                loss = float(loss_sum) / max(loss_rows, 1)
                self._report_step(epoch, (step, steps), loss, rows_done / max(now - started, 1e-9))
            if spec.loop.max_steps is not None and position.global_step >= spec.loop.max_steps:
                break
            if self._every(spec.loop.validate_every_steps, position.global_step):
                self._validate_at_step(epoch, step, position.global_step)
            if self._every(spec.loop.checkpoint_every_steps, position.global_step):
                # the epoch's loss so far, over every rank: rank 0's checkpoint carries it
                partial = _sum_over_ranks((float(loss_sum), loss_rows), self.device)
                position.step, position.loss_sum = step, partial[0]
                position.loss_rows = int(partial[1])
                self._checkpoint(epoch, position, mid_epoch=True)
        self.steps.flush()
        names = sorted(extra_sums)
        totals = _sum_over_ranks(
            (float(loss_sum), loss_rows, *(extra_sums[name] for name in names)), self.device
        )
        loss_total, total_rows = totals[0], totals[1]
        elapsed = time.perf_counter() - started
        from deepspark.training.rank.metrics import reduce_metrics

        reduce_metrics(self.train_metrics, spec.world_size)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_total / max(total_rows, 1.0),
            "train_rows": int(total_rows),
            "steps": step,
            "seconds": elapsed,
            "samples_per_s": total_rows / max(elapsed, 1e-9),
            **self.steps.learning_rates(),  # the rates this epoch trained with
        }
        for name, total in zip(names, totals[2:], strict=True):
            record[f"train_{name}"] = total / max(total_rows, 1.0)
        for metric in self.train_metrics:
            record[f"train_{metric.name}"] = _finite(metric.compute())
        return record

    def _report_step(
        self, epoch: int, position: tuple[int, int | None], loss: float, samples_per_s: float
    ) -> None:
        """Rank 0's progress event for the driver's bar: (step, steps of the epoch), the
        epoch's mean loss so far and the rate."""
        step, steps = position
        event = {"kind": "step", "epoch": epoch, "epochs": self.spec.loop.epochs, "step": step}
        event.update(steps=steps, loss=loss, samples_per_s=samples_per_s)
        self.progress.send(event)

    @staticmethod
    def _every(interval: int | None, global_step: int) -> bool:
        return interval is not None and global_step % interval == 0

    def _validate(self) -> dict[str, float]:
        started = time.perf_counter()
        scores = self.evaluate(self.source, VALIDATION_SPLIT)
        self.marks["validation_s"] += time.perf_counter() - started
        return scores

    def _validate_at_step(self, epoch: int, step: int, global_step: int) -> None:
        """Validation every N steps: a record of its own, and back to training."""
        scores = self._validate()
        record = {"epoch": epoch, "step": step, "global_step": global_step}
        record.update({f"val_{name}": value for name, value in scores.items()})
        self.step_history.append(record)
        if self.rank == 0 and self.progress is not None:
            text = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("val_"))
            self.progress.send({"kind": "log", "text": f"step {global_step}: {text}"})
        self.ddp.train()

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, source, split: int) -> dict[str, float]:
        """Loss and metrics over every rank's rows of ``split`` (exact: summed, then reduced)."""
        from deepspark.training.rank.metrics import reduce_metrics

        spec = self.spec
        if self.steps is None:  # an evaluate job: no optimizer to build
            self.steps = StepRunner(spec, self.model, self.model, self.device, train=False)
        model = self.model
        was_training = model.training
        model.eval()
        for metric in self.val_metrics:
            metric.reset()
        sums: dict[str, float] = {}
        rows_total = 0
        local_batch = max(1, math.ceil(spec.batch_size / spec.world_size))
        for batch in source.ordered(split, local_batch):
            outputs, rows, values = self.steps.evaluate(batch)
            rows_total += rows
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            if outputs is not None and self.val_metrics:
                _update_metrics(self.val_metrics, outputs, self.steps.labels, rows)
        names = sorted(sums) if spec.world_size == 1 else self._value_names(sums)
        totals = _sum_over_ranks((rows_total, *(sums.get(n, 0.0) for n in names)), self.device)
        reduce_metrics(self.val_metrics, spec.world_size)
        model.train(was_training)
        scores = {
            name: total / max(totals[0], 1.0) for name, total in zip(names, totals[1:], strict=True)
        }
        for metric in self.val_metrics:
            scores[metric.name] = _finite(metric.compute())
        return scores

    def _value_names(self, sums: dict[str, float]) -> list[str]:
        """The value names of an evaluation over every rank: a rank without rows has none."""
        if self.steps is not None and self.steps.custom_eval is None:
            return ["loss"] if self.steps.loss_fn is not None else []
        gathered: list[Any] = [None] * self.spec.world_size
        dist.all_gather_object(gathered, sorted(sums))
        return sorted({name for names in gathered for name in names})

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: one decision for all ranks."""
        vote = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item() > 0)

    def _callbacks(
        self, hook: str, *, epoch: int, step: int, logs: dict[str, Any], only: Any = None
    ):
        """Run the rank's callbacks (or ``only`` these) for ``hook``; returns their state
        (None without any)."""
        callbacks = self.callbacks if only is None else only
        if not callbacks:
            return None
        from deepspark.training.callbacks import CallbackState, call_worker_hook

        state = CallbackState(
            epoch=epoch,
            step=step,
            rank=self.rank,
            world_size=self.spec.world_size,
            logs=logs,
            model=self.model,
            epochs=self.spec.loop.epochs,
            params={
                "epochs": self.spec.loop.epochs,
                "batch_size": self.spec.batch_size,
                "num_workers": self.spec.world_size,
            },
        )
        call_worker_hook(callbacks, hook, state)
        return state


def _defines(callback: Any, hook: str) -> bool:
    """Whether ``callback`` has its own ``hook`` (not `Callback`'s empty default)."""
    from deepspark.training.callbacks import Callback

    method = getattr(callback, hook, None)
    return method is not None and getattr(method, "__func__", None) is not getattr(Callback, hook)


def _update_metrics(metrics, outputs: Any, labels: tuple[Any, ...], rows: int) -> None:
    """Feed each metric the output and label it reads, real rows only."""
    from deepspark.training.rank.metric_routing import update_metrics
    from deepspark.training.rank.structure import take_rows

    update_metrics(metrics, take_rows(outputs, rows), take_rows(labels, rows))


def _sum_over_ranks(values: tuple[float, ...], device: torch.device) -> list[float]:
    """Sum plain numbers over every rank. The tensor lives on the rank's device, because NCCL
    (``use_gpu=True``) moves only CUDA memory; float64 keeps row counts exact."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def _finite(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")
