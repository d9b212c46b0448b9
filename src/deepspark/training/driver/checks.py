"""Driver-side checks and conversions that `Estimator` runs before any Spark job."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch
from torch import nn

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from deepspark.training.driver.options import ColumnOptions

__all__ = [
    "check_checkpoint_dir",
    "check_loss",
    "check_model",
    "check_optimizer_factory",
    "check_positive",
    "columns_of",
    "dry_run",
    "optimizer_factory",
    "pickled",
    "resolve_columns",
]


def dry_run(
    model: nn.Module,
    loss: Any,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None,
    df: DataFrame,
    features,
    labels,
    *,
    sample: Any = None,
    metrics: list[Any] | None = None,
) -> None:
    """Run model, loss, optimizer factory and metrics on a few rows on the driver, first.

    Shape and label errors, and an optimizer factory with a wrong signature, surface here with
    the argument's name. `sample` is a pyarrow Table of first rows already fetched; without it
    one is read.
    """
    from deepspark.data import batch_to_tensors
    from deepspark.data.validate import first_rows

    if sample is None:
        sample = first_rows(df, columns_of(features) + columns_of(labels), 4)
    if sample.num_rows == 0:
        raise ValueError("fit: the training DataFrame has no rows")
    if optimizer_factory is not None:
        check_optimizer_factory(optimizer_factory, model)
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
                        f"the labels do not suit the loss: {_name_of(loss)} on "
                        f"outputs of shape {_shape_of(outputs)} and labels of shape "
                        f"{tuple(targets[0].shape)} and dtype {targets[0].dtype} failed: "
                        f"{error}. Check label_cols, or set label_dtypes (class ids need "
                        "int64; regression targets float32 with the output's shape)"
                    ) from error
            _check_metrics(metrics or [], outputs, targets[0] if len(targets) == 1 else targets)
    finally:
        model.train(was_training)


def _check_metrics(metrics: list[Any], outputs: Any, targets: Any) -> None:
    """Each metric updates once on the sample: unknown names and unsuitable shapes fail here."""
    if not metrics:
        return  # and torchmetrics need not be imported
    from deepspark.training.rank.metrics import get_metric

    for metric in metrics:
        try:
            get_metric(metric).update(outputs, targets)
        except Exception as error:
            raise ValueError(
                f"metrics: {metric!r} cannot be computed on the model's outputs of shape "
                f"{_shape_of(outputs)} and the labels: {type(error).__name__}: {error}"
            ) from error


def check_optimizer_factory(factory: Callable[[Any], Any], model: nn.Module) -> None:
    """Call the optimizer factory once on the driver's model: a wrong signature fails here."""
    try:
        optimizer = factory(model.parameters())
    except Exception as error:
        raise TypeError(
            f"optimizer={_name_of(factory)} failed when called with the model's parameters: "
            f"{type(error).__name__}: {error}. Give a function params -> Optimizer, e.g. "
            "optimizer=lambda params: torch.optim.Adam(params, lr=1e-3)"
        ) from error
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer={_name_of(factory)} returned {type(optimizer).__name__}, not a "
            "torch.optim.Optimizer. Give a function params -> Optimizer"
        )


def check_model(model: Any, config: dict[str, Any]) -> nn.Module:
    """The driver's `nn.Module`: `model` itself, or what the creator `model(config)` returns."""
    if isinstance(model, nn.Module):
        return model
    if not callable(model):
        raise TypeError(
            f"model must be a torch.nn.Module or a function config -> nn.Module, not "
            f"{type(model).__name__} ({model!r:.60})"
        )
    try:
        built = model(config)
    except Exception as error:
        raise TypeError(
            f"model={_name_of(model)} failed when called with config={config!r}: "
            f"{type(error).__name__}: {error}. A model creator takes the config dict"
        ) from error
    if not isinstance(built, nn.Module):
        raise TypeError(
            f"model={_name_of(model)} returned {type(built).__name__}; a model creator must "
            "return a torch.nn.Module"
        )
    return built


def check_loss(loss: Any) -> None:
    """`loss` is callable as ``loss(outputs, labels)``: a function or a loss instance."""
    if not callable(loss):
        raise TypeError(
            f"loss must be callable as loss(outputs, labels), e.g. torch.nn.CrossEntropyLoss(); "
            f"got {type(loss).__name__} ({loss!r:.60})"
        )
    if isinstance(loss, type):
        raise TypeError(
            f"loss is the class {loss.__name__}; pass an instance, e.g. {loss.__name__}()"
        )


def check_checkpoint_dir(checkpoint_dir: str) -> None:
    """The URL's protocol is one fsspec knows, and the driver can create and write the folder."""
    import uuid

    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(checkpoint_dir)
    except (ValueError, ImportError) as error:
        raise ValueError(
            f"checkpoint_dir={checkpoint_dir!r}: {error}. Give a local path or a URL whose "
            "protocol fsspec knows (hdfs://, s3://, gs://, abfs://, file://) with its package "
            "installed"
        ) from error
    probe = f"{root.rstrip('/')}/.deepspark-write-check-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except Exception as error:
        raise ValueError(
            f"checkpoint_dir={checkpoint_dir!r} is not writable from the driver: "
            f"{type(error).__name__}: {error}. Give a folder every executor and the driver "
            "can write"
        ) from error


def _name_of(value: Any) -> str:
    name = getattr(value, "__qualname__", None) or type(value).__name__
    return "<lambda>" if name.endswith("<lambda>") else name


def _shape_of(outputs: Any) -> Any:
    shape = getattr(outputs, "shape", None)
    return tuple(shape) if shape is not None else type(outputs).__name__


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


# The first rows each DataFrame object showed, per column list. A fit repeated on the same
# DataFrame (a search's trials, a notebook cell run again) checks against them without another
# Spark job; only the driver's checks read them, every job reads the data afresh.
_first_rows_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_columns(df, feature_cols, label_cols, options: ColumnOptions):
    """Column specs for features and labels, and the first rows they were checked on.

    One look at the first rows (a small Spark job, once per DataFrame object and columns)
    serves both checks and the dry run.
    """
    from deepspark.data.validate import resolve_specs

    names = _flat_names(feature_cols) + _flat_names(label_cols)
    sample = _first_rows_once(df, names) if set(names) <= set(df.columns) else None
    shared = {"shapes": options.feature_shapes, "decoders": options.decoders, "sample": sample}
    features = resolve_specs(
        df, feature_cols, role="feature", dtypes=options.feature_dtypes, **shared
    )
    labels = resolve_specs(df, label_cols, role="label", dtypes=options.label_dtypes, **shared)
    return features, labels, sample


def _first_rows_once(df, names: list[str]):
    from deepspark.data.validate import first_rows

    try:
        seen = _first_rows_seen.setdefault(df, {})
    except TypeError:  # an object that cannot be weakly referenced: no memory of it
        seen = {}
    key = tuple(names)
    if key not in seen:
        seen[key] = first_rows(df, names, 8)
    return seen[key]


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


def fit_workers(spark: Any, num_workers: int | None, batch_size: int) -> int:
    """The ranks of a fit: every free task slot by default, refused when the stage cannot run."""
    from deepspark.training.driver.stage import available_task_slots

    slots = available_task_slots(spark)
    if num_workers is None:
        num_workers = slots
    check_positive("num_workers", num_workers)
    if num_workers > slots:
        raise ValueError(
            f"num_workers={num_workers} is more than the {slots} task slots this Spark "
            "application has; a barrier stage needs all its tasks at once. Lower "
            "num_workers or add executors/cores"
        )
    if batch_size < num_workers:
        raise ValueError(
            f"batch_size={batch_size} is smaller than num_workers={num_workers}: every "
            "worker needs at least one row per step. Raise batch_size or lower num_workers"
        )
    return num_workers
