"""The rows of a `deepspark.run` job: every DataFrame given to the run, in one barrier stage.

Driver side. Each DataFrame's rows carry its index in the split column, which the ranks spill
by (one split per DataFrame), so `deepspark.shard` reads one of them. One DataFrame, or a
training and a validation DataFrame with the same columns, go through the job input of
`Estimator.fit` (`jobs.job_input`: no shuffle when the partitions already match the ranks,
the converted chunks of `deepspark.cache`); other mixes are a union of all their columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from deepspark.training.job_spec import SPLIT_COLUMN

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["frames_input"]


def frames_input(frames: Sequence[DataFrame], num_workers: int) -> DataFrame:
    """The stage's input: every frame's rows tagged by their index, in `num_workers` parts."""
    from deepspark.training.driver.jobs import job_input

    for index, frame in enumerate(frames):
        if SPLIT_COLUMN in frame.columns:
            raise ValueError(
                f"deepspark.run: DataFrame {index} has a column named {SPLIT_COLUMN!r}, which "
                "the run uses itself; rename it"
            )
    columns = list(frames[0].columns)
    if len(frames) <= 2 and all(list(frame.columns) == columns for frame in frames):
        validation = frames[1] if len(frames) == 2 else None
        return job_input(
            frames[0], columns, num_workers, split=0, validation=validation, validation_split=1
        )
    return _union(frames, num_workers)


def _union(frames: Sequence[DataFrame], num_workers: int) -> DataFrame:
    from pyspark.sql import functions as F

    tagged = [
        frame.withColumn(SPLIT_COLUMN, F.lit(index).cast("int"))
        for index, frame in enumerate(frames)
    ]
    data = tagged[0]
    for index, other in enumerate(tagged[1:], start=1):
        try:
            data = data.unionByName(other, allowMissingColumns=True)
        except Exception as error:
            raise ValueError(
                f"deepspark.run: DataFrame {index} cannot travel with the ones before it: a "
                f"column of the same name has another type ({type(error).__name__}: "
                f"{str(error).splitlines()[0]}). Rename or cast the column, or run the "
                "DataFrames in separate runs"
            ) from error
    return data.repartition(num_workers)
