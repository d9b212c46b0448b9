"""The torch loop's backend of the engine: what an `Estimator`'s ranks build and check.

Driver side. `TorchBackend` holds the estimator's model and training parts; the engine
(`deepspark.training.engine`) asks it for the job's `RankProgram`, its step policy and the
dry run of model, loss and metrics on the first rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepspark.training.backend import Backend
from deepspark.training.job_spec import JobKind, RankLoop, RankProgram
from deepspark.training.options import FitOptions, StepOptions

__all__ = ["TorchBackend"]


@dataclass
class TorchBackend(Backend):
    """An estimator's PyTorch model and its training parts, as the engine runs them."""

    model: nn.Module
    loss: Any
    optimizer_factory: Callable[[Any], Any] | None
    scheduler: Callable[[Any], Any] | None
    metrics: Any
    steps: StepOptions
    config: dict[str, Any]
    use_gpu: bool = False
    # the last fit's optimizer state, already checked against this fit's optimizers
    optimizer_state: bytes | None = None

    loop = RankLoop.TORCH

    def prepare(self, options: FitOptions) -> FitOptions:
        """Refuse a fit without loss or optimizer; the step policy; the driver's seed."""
        if self.steps.train_step is None and self.loss is None:
            raise ValueError(
                "this estimator has no loss: it was built for inference (predict, evaluate). "
                "To train, build it with Estimator.from_torch(model, optimizer=..., loss=...)"
            )
        if self.optimizer_factory is None:
            raise ValueError(
                "fit needs an optimizer: Estimator.from_torch(model, optimizer=lambda params: "
                "torch.optim.Adam(params), ...)"
            )
        policy = self.steps.policy(options.data.step_policy)
        if options.loop.seed is not None:
            torch.manual_seed(options.loop.seed)
        return dataclasses.replace(
            options, data=dataclasses.replace(options.data, step_policy=policy)
        )

    def check_sample(self, df: Any, features: Any, labels: Any, sample: Any) -> None:
        """Model, loss, optimizer factory and metrics on the first rows, on the driver."""
        from deepspark.training.driver.checks import dry_run

        if self.steps.train_step is not None:  # a custom step uses the model its way
            return
        dry_run(
            self.model,
            self.loss,
            self.optimizer_factory,
            df,
            features,
            labels,
            sample=sample,
            metrics=self.metrics,
            collate=self.steps.collate_fn,
        )

    def program(self, kind: JobKind) -> RankProgram:
        """The model and its parts, pickled for the ranks."""
        from deepspark.training.driver.checks import pickled

        def blob(name: str, value: Any) -> bytes | None:
            return None if value is None else pickled(name, value)

        steps = self.steps
        return RankProgram(
            model_blob=pickled("model", self.model),
            loss_blob=blob("loss", self.loss),
            optimizer_blob=blob("optimizer", self.optimizer_factory),
            scheduler_blob=blob("scheduler", self.scheduler),
            metrics_blob=pickled("metrics", self.metrics),
            config=self.config,
            use_gpu=self.use_gpu,
            train_step_blob=blob("train_step", steps.train_step),
            eval_step_blob=blob("eval_step", steps.eval_step),
            collate_blob=blob("collate_fn", steps.collate_fn),
            scheduler_interval=steps.scheduler_interval,
            scheduler_monitor=steps.scheduler_monitor,
            optimizer_state_blob=self.optimizer_state if kind is JobKind.FIT else None,
        )

    def load_weights(self, blob: bytes) -> None:
        """Rank 0's trained weights (safetensors) into the driver's model."""
        from deepspark.persist.weights import weights_from_bytes

        self.model.load_state_dict(weights_from_bytes(blob))
