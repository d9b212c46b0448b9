"""Driver-side checks and conversions that `Estimator` runs before any Spark job."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch
from torch import nn

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = [
    "check_positive",
    "columns_of",
    "dry_run",
    "optimizer_factory",
    "pickled",
    "resolve_columns",
]


def dry_run(
    model: nn.Module, loss: Any, df: DataFrame, features, labels, *, sample: Any = None
) -> None:
    """Run model and loss on a few rows on the driver: shape and label errors surface here.

    `sample` is a pyarrow Table of first rows already fetched; without it one is read.
    """
    from deepspark.data import batch_to_tensors
    from deepspark.data.validate import first_rows

    if sample is None:
        sample = first_rows(df, columns_of(features) + columns_of(labels), 4)
    if sample.num_rows == 0:
        raise ValueError("fit: the training DataFrame has no rows")
    inputs = batch_to_tensors(sample, features)
    targets = batch_to_tensors(sample, labels)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                outputs = model(*inputs)
            except Exception as error:
                shapes = ", ".join(str(tuple(t.shape[1:])) for t in inputs)
                raise ValueError(
                    f"the model failed on a sample batch with feature shapes {shapes} "
                    f"(per row): {error}. Check feature_cols and feature_shapes"
                ) from error
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                try:
                    loss(outputs, targets[0] if len(targets) == 1 else targets)
                except Exception as error:
                    raise ValueError(
                        f"the labels do not suit the loss: {type(loss).__name__} on "
                        f"outputs of shape {tuple(outputs.shape)} and labels of shape "
                        f"{tuple(targets[0].shape)} and dtype {targets[0].dtype} failed: "
                        f"{error}. Check label_cols, or set label_dtypes (class ids need "
                        "int64; regression targets float32 with the output's shape)"
                    ) from error
    finally:
        model.train(was_training)


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: give a positive integer")


def optimizer_factory(optimizer: Any) -> Callable[[Any], torch.optim.Optimizer] | None:
    """Accept `params -> Optimizer`, or an optimizer built on the driver (rebuilt per replica)."""
    if optimizer is None or (
        callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer)
    ):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer_class = type(optimizer)
        hyperparameters = {
            key: value for key, value in optimizer.defaults.items() if key != "params"
        }
        if len(optimizer.param_groups) > 1:
            warnings.warn(
                "the optimizer has several parameter groups; each replica is rebuilt with the "
                "first group's defaults. Pass optimizer=lambda params: ... to keep the groups",
                stacklevel=3,
            )

        def rebuild(params):
            return optimizer_class(params, **hyperparameters)

        return rebuild
    raise TypeError(
        f"optimizer must be a function params -> Optimizer or a torch.optim.Optimizer, "
        f"not {type(optimizer).__name__}"
    )


def pickled(what: str, value: Any) -> bytes:
    try:
        return cloudpickle.dumps(value)
    except Exception as error:
        raise ValueError(
            f"the {what} could not be pickled to send to the workers: {error}. Define it at "
            "module level or as a function, and keep open files, locks and sessions out of it"
        ) from error


def columns_of(specs) -> list[str]:
    names: list[str] = []
    for spec in specs:
        for name in spec.columns:
            if name not in names:
                names.append(name)
    return names


def resolve_columns(df, feature_cols, label_cols, shapes, feature_dtypes, label_dtypes, decoders):
    """Column specs for features and labels, and the first rows they were checked on.

    One look at the first rows (a small Spark job) serves both checks and the dry run.
    """
    from deepspark.data.validate import first_rows, resolve_specs

    names = _flat_names(feature_cols) + _flat_names(label_cols)
    sample = first_rows(df, names, 8) if set(names) <= set(df.columns) else None
    options = {"shapes": shapes, "decoders": decoders, "sample": sample}
    features = resolve_specs(df, feature_cols, role="feature", dtypes=feature_dtypes, **options)
    labels = resolve_specs(df, label_cols, role="label", dtypes=label_dtypes, **options)
    return features, labels, sample


def _flat_names(cols: Any) -> list[str]:
    """Column names in a feature_cols / label_cols argument (nested lists flattened)."""
    if cols is None:
        return []
    if isinstance(cols, str):
        return [cols]
    names: list[str] = []
    for item in cols:
        names.extend([item] if isinstance(item, str) else list(item))
    return names
