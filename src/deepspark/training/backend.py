"""What a framework adds to the training engine: a `Backend`.

The engine (`deepspark.training.engine`) runs what every job needs; a backend says only what
differs between frameworks (Ray Train's idea of a small backend per framework beside one
trainer): which loop its ranks run (`RankLoop`), what they build (`RankProgram`), and what to
check on the driver first. Spark-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepspark.training.job_spec import JobKind, RankLoop, RankProgram

if TYPE_CHECKING:
    from deepspark.data import TensorSpec
    from deepspark.training.options import FitOptions

__all__ = ["Backend"]


class Backend:
    """What one framework adds to the engine; subclass it and override what differs.

    Attributes
    ----------
    loop : RankLoop
        The loop each rank runs: the torch loop (DDP) or the TensorFlow loop
        (``MultiWorkerMirroredStrategy`` in a process of its own per rank).
    takes_creators : bool
        Whether the ranks can build their own batches from a data creator.
    use_gpu : bool
        Whether the ranks train on the GPUs Spark assigns them.
    """

    loop: RankLoop = RankLoop.TORCH
    takes_creators: bool = True
    use_gpu: bool = False

    def prepare(self, options: FitOptions) -> FitOptions:
        """Refuse options this backend cannot run and fill in its defaults (the step
        policy); called before any data is read."""
        return options

    def check_sample(
        self,
        df: Any,
        features: tuple[TensorSpec, ...],
        labels: tuple[TensorSpec, ...],
        sample: Any,
    ) -> None:
        """Check the model against the first rows of a fit's training data (a dry run)."""

    def program(self, kind: JobKind) -> RankProgram:
        """What the ranks build for a job of `kind`, pickled."""
        raise NotImplementedError(f"{type(self).__name__} must say what its ranks build")

    def load_weights(self, blob: bytes) -> None:
        """Put rank 0's trained weights (the bytes a fit brought back) into the driver's model."""
        raise NotImplementedError(f"{type(self).__name__} takes no trained weights back")
