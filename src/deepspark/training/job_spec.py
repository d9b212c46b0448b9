"""The plain, picklable description of one training or evaluation job.

Built on the driver, shipped to every rank inside the Spark task closure. It holds bytes and
plain values only, so nothing from the driver's objects (sessions, servers) leaks into tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["RESULT_SCHEMA", "JobKind", "ResultKind", "TrainSpec"]


class JobKind(str, Enum):
    FIT = "fit"
    EVALUATE = "evaluate"


class ResultKind(str, Enum):
    """Rows rank 0 sends back to the driver through the stage's output."""

    WEIGHTS = "weights"  # safetensors bytes, in bounded chunks
    HISTORY = "history"  # JSON list of per-epoch records
    METRICS = "metrics"  # JSON dict (evaluate)
    STEP_HISTORY = "step_history"  # JSON list of validations every N steps
    OPTIMIZER = "optimizer"  # torch.save of the optimizers' state, in bounded chunks


# One output row per result chunk; Spark's own result path carries them to the driver.
RESULT_SCHEMA = "rank int, kind string, seq int, payload binary"
RESULT_CHUNK_BYTES = 8 * 1024 * 1024

SPLIT_COLUMN = "__deepspark_split"
TRAIN_SPLIT = 0
VALIDATION_SPLIT = 1


@dataclass
class TrainSpec:
    """Everything a rank needs; see `deepspark.training.rank.run.run_rank`."""

    kind: JobKind
    model_blob: bytes  # cloudpickle of the driver's nn.Module (with its current weights)
    loss_blob: bytes | None  # None: an estimator built for inference (evaluate: metrics only)
    optimizer_blob: bytes | None
    scheduler_blob: bytes | None
    metrics_blob: bytes  # cloudpickle of a list of metric names / objects
    callbacks_blob: bytes | None
    config: dict[str, Any]
    features: tuple[Any, ...]  # deepspark.data.TensorSpec
    labels: tuple[Any, ...]
    world_size: int
    epochs: int
    batch_size: int
    step_policy: str = "pad"
    seed: int = 0
    has_validation: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    resume: bool = True
    progress_address: tuple[str, int] | None = None
    progress_token: str = ""
    rendezvous_host: str | None = None
    collective_timeout_s: float = 600.0
    use_gpu: bool = False
    job_id: str = ""
    attempt: int = 0  # the driver's attempt number: a rendezvous belongs to one attempt
    stream_first_epoch: bool = True  # train epoch 0 while the partition arrives
    allow_non_finite: bool = False  # a fit's ranks refuse NaN / inf in their rows unless set
    # control of the loop (see Estimator.fit)
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    validate_every_steps: int | None = None
    checkpoint_every_steps: int | None = None
    accumulate_steps: int = 1
    clip_grad_norm: float | None = None
    precision: str = "fp32"
    scheduler_interval: str = "epoch"  # or "step"
    scheduler_monitor: str | None = None  # what ReduceLROnPlateau reads
    # the user's own steps and batch hook (cloudpickle), see Estimator.from_torch
    train_step_blob: bytes | None = None
    eval_step_blob: bytes | None = None
    collate_blob: bytes | None = None
    # the last fit's optimizer state (deepspark.persist.optimizer_state), loaded into the
    # fresh optimizers so that this fit continues it; a checkpoint resumed from wins
    optimizer_state_blob: bytes | None = None
    # data the ranks make themselves: creator(config, batch_size) -> DataLoader, per split
    creator_blobs: dict[int, bytes] | None = None
    creator_keys: tuple[Any, Any] | None = None  # dict batches: (feature keys, label keys)
