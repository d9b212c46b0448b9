"""The epoch loop of one rank: DDP training with exact global-batch losses, and evaluation.

No pyspark here (DESIGN decision 12).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
from torch import nn

from deepspark.training.job_spec import TRAIN_SPLIT, VALIDATION_SPLIT, TrainSpec

__all__ = ["EpochRunner", "build_model", "make_optimizer", "make_scheduler"]

_log = logging.getLogger(__name__)

# Rank 0 sends a progress event at most this often, so the channel never slows training.
PROGRESS_INTERVAL_S = 0.5


def build_model(spec: TrainSpec) -> nn.Module:
    model = cloudpickle.loads(spec.model_blob)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the job's model is a {type(model).__name__}, not an nn.Module")
    return model


def make_optimizer(spec: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer_blob is None:
        raise ValueError(
            "fit needs an optimizer: pass optimizer=lambda params: torch.optim.Adam(params)"
        )
    factory = cloudpickle.loads(spec.optimizer_blob)
    optimizer = factory(model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer(params) returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    return optimizer


def make_scheduler(spec: TrainSpec, optimizer: torch.optim.Optimizer) -> Any:
    if spec.scheduler_blob is None:
        return None
    return cloudpickle.loads(spec.scheduler_blob)(optimizer)


def _loss_target(labels: tuple[torch.Tensor, ...]) -> Any:
    return labels[0] if len(labels) == 1 else labels


def _slice_rows(tensors: tuple[torch.Tensor, ...], rows: int) -> tuple[torch.Tensor, ...]:
    return tuple(tensor[:rows] for tensor in tensors)


def _to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    if device.type == "cpu":
        return tensors
    return tuple(tensor.to(device, non_blocking=True) for tensor in tensors)


class EpochRunner:
    """Runs epochs for one rank; every rank runs the same number of steps and collectives."""

    def __init__(
        self, spec: TrainSpec, model: nn.Module, device: torch.device, rank: int, progress
    ):
        from deepspark.training.rank.metrics import get_metric

        self.spec = spec
        self.model = model
        self.device = device
        self.rank = rank
        self.progress = progress
        self.loss_fn = cloudpickle.loads(spec.loss_blob)
        metric_defs = cloudpickle.loads(spec.metrics_blob)
        self.metric_defs = metric_defs
        self.val_metrics = [get_metric(copy.deepcopy(m)).to(device) for m in metric_defs]
        self.train_metrics = [get_metric(copy.deepcopy(m)).to(device) for m in metric_defs]
        self.callbacks = cloudpickle.loads(spec.callbacks_blob) if spec.callbacks_blob else []
        self.ddp: nn.Module | None = None
        # wall-clock moments for the fit's timeline: first step done, training done, and the
        # seconds spent in validation
        self.marks: dict[str, float] = {"validation_s": 0.0}

    # --- training ---------------------------------------------------------------------------

    def fit(self, source) -> list[dict[str, Any]]:
        """Train every epoch; ``source`` is the rank's input (see `rank.run.RankInput`)."""
        from torch.nn.parallel import DistributedDataParallel

        from deepspark.training.rank.checkpoint import (
            latest_checkpoint,
            load_checkpoint,
            save_checkpoint,
        )

        spec = self.spec
        optimizer = make_optimizer(spec, self.model)
        scheduler = make_scheduler(spec, optimizer)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if spec.checkpoint_dir and spec.resume:
            info = latest_checkpoint(spec.checkpoint_dir)
            if info is not None:
                restored = load_checkpoint(info, self.model, optimizer, scheduler)
                start_epoch = int(restored["epoch"]) + 1
                history = list((restored.get("extra") or {}).get("history", []))
                if self.rank == 0:
                    _log.info("resuming from %s at epoch %d", info, start_epoch)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.marks["model_ready"] = time.time()
        self._callbacks("on_train_begin", epoch=start_epoch, step=0, logs={})
        for epoch in range(start_epoch, spec.epochs):
            self._callbacks("on_epoch_begin", epoch=epoch, step=0, logs={})
            if epoch == 0 and source.can_stream():
                batches, steps = source.streamed_epoch(self.device), None
            else:
                spill, plan = source.spill(), source.plan(self.device)
                steps = plan.steps_per_epoch
                batches = _with_divisors(
                    spill.epoch(
                        spec.features,
                        spec.labels,
                        plan=plan,
                        rank=self.rank,
                        epoch=epoch,
                        seed=spec.seed,
                        shuffle=True,
                        split=TRAIN_SPLIT,
                    ),
                    plan,
                )
            record = self._train_epoch(batches, steps, epoch, optimizer)
            if scheduler is not None:
                scheduler.step()
            if spec.has_validation:
                validation_started = time.perf_counter()
                scores = self.evaluate(source.spill(), VALIDATION_SPLIT)
                record.update({f"val_{name}": value for name, value in scores.items()})
                self.marks["validation_s"] += time.perf_counter() - validation_started
            history.append(record)
            if self.rank == 0 and self.progress is not None:
                self.progress.send({"kind": "epoch", "epoch": epoch, "metrics": record})
            if (
                self.rank == 0
                and spec.checkpoint_dir
                and ((epoch + 1) % spec.checkpoint_every == 0 or epoch + 1 == spec.epochs)
            ):
                save_checkpoint(
                    spec.checkpoint_dir,
                    epoch,
                    self.model,
                    optimizer,
                    scheduler,
                    extra={"history": history},
                )
            self._callbacks("on_epoch_end", epoch=epoch, step=record["steps"], logs=record)
        self.marks["train_done"] = time.time()
        self._callbacks(
            "on_train_end", epoch=spec.epochs, step=0, logs=history[-1] if history else {}
        )
        return history

    def _train_epoch(self, batches, steps: int | None, epoch: int, optimizer) -> dict[str, Any]:
        """One epoch over ``batches``: pairs of a batch and its step's global real-row count.

        ``steps`` is the epoch's step count when known in advance (``None`` while streaming).
        """
        assert self.ddp is not None
        spec, rank = self.spec, self.rank
        self.ddp.train()
        for metric in self.train_metrics:
            metric.reset()
        loss_sum: Any = 0.0  # sum of per-row losses on this rank (a tensor after a step)
        loss_rows = 0
        started = time.perf_counter()
        last_report = -math.inf  # report the first step at once: it marks time-to-first-step
        world = spec.world_size
        rows_done = 0  # global real rows so far, for the progress rate
        step = -1
        for step, (batch, global_real) in enumerate(batches):
            features = _to_device(batch.features, self.device)
            labels = _to_device(batch.labels, self.device)
            real = batch.num_real
            rows_done += global_real
            optimizer.zero_grad(set_to_none=True)
            outputs = self.ddp(*features)
            if real > 0:
                loss = self.loss_fn(outputs[:real], _loss_target(_slice_rows(labels, real)))
                # DDP averages gradients over ranks; scaling by this rank's share of the global
                # batch makes the result the exact mean over every real row of the step.
                scaled = loss * (real * world / max(global_real, 1))
                # summed on the device: no host sync per step (a CUDA stream keeps running)
                loss_sum = loss_sum + loss.detach() * real
                loss_rows += real
                with torch.no_grad():
                    for metric in self.train_metrics:
                        metric.update(outputs[:real], labels[0][:real])
            else:
                # Filler step: contribute zero gradient but join every collective.
                scaled = outputs.sum() * 0.0
            scaled.backward()
            optimizer.step()
            if "first_step" not in self.marks:
                self.marks["first_step"] = time.time()
            if self.callbacks:
                self._callbacks(
                    "on_batch_end", epoch=epoch, step=step, logs={"loss": float(scaled.detach())}
                )
            now = time.perf_counter()
            if rank == 0 and self.progress is not None and now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                self.progress.send(
                    {
                        "kind": "step",
                        "epoch": epoch,
                        "epochs": spec.epochs,
                        "step": step + 1,
                        "steps": steps,
                        "loss": float(loss_sum) / max(loss_rows, 1),
                        "samples_per_s": rows_done / max(now - started, 1e-9),
                    }
                )
        loss_total, total_rows = _sum_over_ranks((float(loss_sum), loss_rows), self.device)
        elapsed = time.perf_counter() - started
        from deepspark.training.rank.metrics import reduce_metrics

        reduce_metrics(self.train_metrics, world)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_total / max(total_rows, 1.0),
            "train_rows": int(total_rows),
            "steps": step + 1,
            "seconds": elapsed,
            "samples_per_s": total_rows / max(elapsed, 1e-9),
        }
        for metric in self.train_metrics:
            record[f"train_{metric.name}"] = _finite(metric.compute())
        return record

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, spill, split: int) -> dict[str, float]:
        from deepspark.training.rank.metrics import reduce_metrics

        spec = self.spec
        model = self.model
        was_training = model.training
        model.eval()
        for metric in self.val_metrics:
            metric.reset()
        loss_total, loss_rows = 0.0, 0
        local_batch = max(1, math.ceil(spec.batch_size / spec.world_size))
        for batch in spill.ordered(spec.features, spec.labels, batch_size=local_batch, split=split):
            features = _to_device(batch.features, self.device)
            labels = _to_device(batch.labels, self.device)
            outputs = model(*features)
            rows = int(outputs.shape[0])
            loss = self.loss_fn(outputs, _loss_target(labels))
            loss_total += float(loss) * rows
            loss_rows += rows
            for metric in self.val_metrics:
                metric.update(outputs, labels[0])
        loss_total, total_rows = _sum_over_ranks((loss_total, loss_rows), self.device)
        reduce_metrics(self.val_metrics, spec.world_size)
        model.train(was_training)
        scores = {"loss": loss_total / max(total_rows, 1.0)}
        for metric in self.val_metrics:
            scores[metric.name] = _finite(metric.compute())
        return scores

    def _callbacks(self, hook: str, *, epoch: int, step: int, logs: dict[str, Any]) -> None:
        if not self.callbacks:
            return
        from deepspark.training.callbacks import CallbackState, call_worker_hook

        state = CallbackState(
            epoch=epoch,
            step=step,
            rank=self.rank,
            world_size=self.spec.world_size,
            logs=logs,
            model=self.model,
            epochs=self.spec.epochs,
            params={
                "epochs": self.spec.epochs,
                "batch_size": self.spec.batch_size,
                "num_workers": self.spec.world_size,
            },
        )
        call_worker_hook(self.callbacks, hook, state)


def _with_divisors(batches, plan):
    """Each batch of a planned epoch with its step's global real-row count."""
    for step, batch in enumerate(batches):
        yield batch, plan.global_real_rows(step)


def _sum_over_ranks(values: tuple[float, ...], device: torch.device) -> list[float]:
    """Sum plain numbers over every rank. The tensor lives on the rank's device, because NCCL
    (``use_gpu=True``) moves only CUDA memory; float64 keeps row counts exact."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def _finite(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")
