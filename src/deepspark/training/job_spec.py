"""The plain, picklable description of one training or evaluation job.

Built on the driver, shipped to every rank inside the Spark task closure. It holds bytes and
plain values only, so nothing from the driver's objects (sessions, servers) leaks into tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from deepspark.training.options import LoopOptions, RecoveryOptions

__all__ = ["RESULT_SCHEMA", "JobKind", "RankLoop", "RankProgram", "ResultKind", "TrainSpec"]


class JobKind(str, Enum):
    FIT = "fit"
    EVALUATE = "evaluate"
    RUN = "run"  # a user's own function or script (`deepspark.run`)


class RankLoop(str, Enum):
    """The loop each rank of a job runs (`deepspark.training.engine.Backend.loop`)."""

    TORCH = "torch"  # rank.run: DistributedDataParallel over torch.distributed
    TENSORFLOW = "tensorflow"  # rank._tf_rank: MultiWorkerMirroredStrategy, a process per rank
    FUNCTION = "function"  # rank._function_rank: a user's own function or script (deepspark.run)


class ResultKind(str, Enum):
    """Rows rank 0 sends back to the driver through the stage's output."""

    WEIGHTS = "weights"  # safetensors bytes, in bounded chunks
    HISTORY = "history"  # JSON list of per-epoch records
    METRICS = "metrics"  # JSON dict (evaluate)
    STEP_HISTORY = "step_history"  # JSON list of validations every N steps
    OPTIMIZER = "optimizer"  # torch.save of the optimizers' state, in bounded chunks
    RETURN = "return"  # cloudpickle of a user function's return value (`deepspark.run`)


# One output row per result chunk; Spark's own result path carries them to the driver.
RESULT_SCHEMA = "rank int, kind string, seq int, payload binary"
RESULT_CHUNK_BYTES = 8 * 1024 * 1024

SPLIT_COLUMN = "__deepspark_split"
TRAIN_SPLIT = 0
VALIDATION_SPLIT = 1


@dataclass
class RankProgram:
    """What a backend's ranks build: the model and its training parts, pickled on the driver.

    The torch loop reads every field; the TensorFlow loop reads the model (a ``.keras``
    file's bytes), the loss, optimizer and metrics (Keras compile arguments) and the config.
    """

    model_blob: bytes  # cloudpickle of the driver's model (with its current weights)
    loss_blob: bytes | None = None  # None: an estimator built for inference
    optimizer_blob: bytes | None = None
    scheduler_blob: bytes | None = None
    metrics_blob: bytes | None = None  # cloudpickle of a list of metric names / objects
    config: dict[str, Any] = field(default_factory=dict)
    use_gpu: bool = False
    # the user's own steps and batch hook (cloudpickle), see Estimator.from_torch
    train_step_blob: bytes | None = None
    eval_step_blob: bytes | None = None
    collate_blob: bytes | None = None
    scheduler_interval: str = "epoch"  # or "step"
    scheduler_monitor: str | None = None  # what ReduceLROnPlateau reads
    # the last fit's optimizer state (deepspark.persist.optimizer_state), loaded into the
    # fresh optimizers so that this fit continues it; a checkpoint resumed from wins
    optimizer_state_blob: bytes | None = None


@dataclass
class TrainSpec:
    """Everything a rank needs; see `deepspark.training.rank.run.run_rank`.

    The fit's options travel as their groups (`deepspark.training.options`), with the values
    the driver resolved: the step policy, the seed (0 when none was given).
    """

    kind: JobKind
    program: RankProgram
    features: tuple[Any, ...]  # deepspark.data.TensorSpec
    labels: tuple[Any, ...]
    world_size: int
    batch_size: int
    step_policy: str = "pad"
    stream_first_epoch: bool = True  # train epoch 0 while the partition arrives
    allow_non_finite: bool = False  # a fit's ranks refuse NaN / inf in their rows unless set
    loop: LoopOptions = field(default_factory=LoopOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    collective_timeout_s: float = 600.0
    has_validation: bool = False
    callbacks_blob: bytes | None = None
    # the job's identity and where its ranks meet the driver
    job_id: str = ""
    attempt: int = 0  # the driver's attempt number: a rendezvous belongs to one attempt
    progress_address: tuple[str, int] | None = None
    progress_token: str = ""
    rendezvous_host: str | None = None
    # data the ranks make themselves: creator(config, batch_size) -> DataLoader, per split
    creator_blobs: dict[int, bytes] | None = None
    creator_keys: tuple[Any, Any] | None = None  # dict batches: (feature keys, label keys)

    @property
    def seed(self) -> int:
        """The seed of the replicas and the shuffle."""
        return int(self.loop.seed or 0)
