"""Driver-side checks and conversions that `Estimator` runs before any Spark job."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
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
    "flat_names",
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
    metrics: Any = None,
    collate: Callable[[Any, Any], Any] | None = None,
) -> None:
    """Run model, loss, optimizer factory and metrics on a few rows on the driver, first.

    Shape and label errors, and an optimizer factory with a wrong signature, surface here with
    the argument's name. The model gets its arguments as a job's batches hold them (dicts for
    a ``feature_cols`` dict or struct columns), may return a tensor or a dict, tuple or list
    of them, and the loss gets that output whole with the labels (one tensor, or a tuple or
    dict of several). `sample` is a pyarrow Table of first rows already fetched; without it
    one is read. `metrics` is a list or a dict (see `deepspark.training.rank.metrics`).
    """
    from deepspark.data import assemble, batch_to_tensors
    from deepspark.data.validate import first_rows
    from deepspark.training.rank.structure import num_rows

    if sample is None:
        sample = first_rows(df, columns_of(features) + columns_of(labels), 4)
    if sample.num_rows == 0:
        raise ValueError("fit: the training DataFrame has no rows")
    if optimizer_factory is not None:
        check_optimizer_factory(optimizer_factory, model)
    inputs = assemble(features, batch_to_tensors(sample, features))
    targets = assemble(labels, batch_to_tensors(sample, labels))
    if collate is not None:  # the user's batch hook, as the ranks apply it
        inputs, targets = collate(tuple(inputs), tuple(targets))
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        targets = targets if isinstance(targets, tuple) else (targets,)
    target = targets[0] if len(targets) == 1 else targets
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                outputs = model(*inputs)
            except Exception as error:
                raise ValueError(
                    f"the model failed on a sample batch with features of shape "
                    f"{_shapes_text(inputs)} (batch first): {error}. Check feature_cols and "
                    "feature_shapes"
                ) from error
            if not isinstance(outputs, torch.Tensor):
                try:
                    num_rows(outputs)
                except ValueError as error:
                    raise ValueError(f"the model's output on a sample batch: {error}") from None
            if loss is not None:
                _check_loss_on(loss, outputs, target)
            _check_metrics(metrics, outputs, targets)
    finally:
        model.train(was_training)


def _check_loss_on(loss: Any, outputs: Any, target: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            loss(outputs, target)
        except Exception as error:
            raise ValueError(
                f"the labels do not suit the loss: {_name_of(loss)} on outputs of shape "
                f"{_shapes_text(outputs)} and labels of shape {_shapes_text(target)} "
                f"({_dtypes_text(target)}) failed: {error}. Check label_cols, or set "
                "label_dtypes (class ids need int64; regression targets float32 with the "
                "output's shape)"
            ) from error


def _check_metrics(metrics: Any, outputs: Any, targets: Any) -> None:
    """Each metric updates once on the sample: unknown names, outputs or labels that do not
    exist, and unsuitable shapes fail here, naming the metric."""
    if not metrics:
        return  # and torchmetrics need not be imported
    from deepspark.training.rank.metric_routing import (
        build_metrics,
        metric_definitions,
        update_metrics,
    )

    definitions = metric_definitions(metrics)
    entries = (
        [({metric: reads}, metric) for metric, reads in definitions.items()]
        if isinstance(definitions, dict)
        else [([metric], metric) for metric in definitions]
    )
    for single, metric in entries:
        try:
            update_metrics(build_metrics(single), outputs, targets)
        except Exception as error:
            name = metric if isinstance(metric, str) else _name_of(metric)
            raise ValueError(
                f"metrics: {name!r} cannot be computed on the model's outputs of shape "
                f"{_shapes_text(outputs)} and the labels: {type(error).__name__}: {error}"
            ) from error
    build_metrics(definitions)  # and no two report under one name


def _shapes_text(value: Any) -> str:
    """The per-tensor shapes of a tensor or a nested dict, tuple or list of them."""

    def shapes(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return tuple(item.shape)
        if isinstance(item, dict):
            return {key: shapes(inner) for key, inner in item.items()}
        if isinstance(item, (tuple, list)):
            return tuple(shapes(inner) for inner in item)
        return type(item).__name__

    return str(shapes(value))


def _dtypes_text(value: Any) -> str:
    from deepspark.training.rank.structure import map_tensors

    found: list[str] = []
    map_tensors(value, lambda tensor: found.append(str(tensor.dtype).removeprefix("torch.")))
    return "dtype " + ", ".join(dict.fromkeys(found)) if found else "no tensors"


def check_optimizer_factory(factory: Callable[[Any], Any], model: nn.Module) -> None:
    """Call the optimizer factory once on the driver's model: a wrong signature fails here."""
    from deepspark.training.rank.step import takes_model

    gets_model = takes_model(factory)
    try:
        built = factory(model) if gets_model else factory(model.parameters())
    except Exception as error:
        given = "the model" if gets_model else "the model's parameters"
        raise TypeError(
            f"optimizer={_name_of(factory)} failed when called with {given}: "
            f"{type(error).__name__}: {error}. Give a function params -> Optimizer, e.g. "
            "optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), or model -> a list "
            "of optimizers"
        ) from error
    for optimizer in built if gets_model and isinstance(built, (list, tuple)) else [built]:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer={_name_of(factory)} returned {type(optimizer).__name__}, not a "
                "torch.optim.Optimizer. Give a function params -> Optimizer"
            )


def check_model(model: Any, config: dict[str, Any]) -> nn.Module:
    """The driver's `nn.Module`: `model` itself, or what the creator `model(config)` returns.

    A TorchScript module (``torch.jit.load``) is wrapped so that it pickles to the ranks.
    """
    if isinstance(model, torch.jit.ScriptModule):
        from deepspark.persist.programs import ProgramModule

        return ProgramModule(model)
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

    names = flat_names(feature_cols) + flat_names(label_cols)
    sample = _first_rows_once(df, names) if set(names) <= set(df.columns) else None
    shared = {"shapes": options.feature_shapes, "decoders": options.decoders, "sample": sample}
    features = resolve_specs(
        df, feature_cols, role="feature", dtypes=options.feature_dtypes, **shared
    )
    labels = resolve_specs(df, label_cols, role="label", dtypes=options.label_dtypes, **shared)
    return features, labels, sample


def check_validation_like_training(
    validation, df, feature_cols, label_cols, options: ColumnOptions, specs: tuple
):
    """Refuse a `validation_data` frame that would not feed the tensors `df` feeds: every check
    `df` passed, on the driver, with messages that name ``validation_data``.

    Returns the validation frame's first rows (for the non-finite check).
    """
    from deepspark.data.spec import FeedError

    names = list(dict.fromkeys(flat_names(feature_cols) + flat_names(label_cols)))
    missing = [name for name in names if name not in validation.columns]
    if missing:
        raise FeedError(
            f"validation_data has no column {missing!r} (feature_cols/label_cols name it and "
            f"df has it); validation_data has {validation.columns!r}"
        )
    try:
        features, labels, sample = resolve_columns(validation, feature_cols, label_cols, options)
    except ValueError as error:
        raise FeedError(f"validation_data: {error}") from error
    for trained, validated in zip(specs, (*features, *labels), strict=True):
        if (trained.kind, trained.shape, trained.dtype) != (
            validated.kind,
            validated.shape,
            validated.dtype,
        ):
            name = trained.columns[0]
            raise FeedError(
                f"validation_data's column {name!r} is "
                f"{validation.schema[name].dataType.simpleString()} and gives "
                f"{_described(validated)}, but df's is "
                f"{df.schema[name].dataType.simpleString()} and gives {_described(trained)}; "
                "give validation_data the same column types and shapes as df (cast it in "
                "Spark, e.g. F.col(name).cast(...))"
            )
    return sample


def _described(spec) -> str:
    kind = getattr(spec.kind, "value", spec.kind)
    return f"{kind} {spec.dtype} rows of shape {tuple(spec.shape)}"


def check_finite_sample(sample, features, labels, arg: str) -> None:
    """Refuse NaN / inf in the first rows the driver already fetched (no extra job).

    The ranks count the whole input; this finds the common case before a job starts.
    """
    from deepspark.data.finite import non_finite_counts, non_finite_message
    from deepspark.data.spec import FeedError

    if sample is None:
        return
    names = list(dict.fromkeys(name for spec in (*features, *labels) for name in spec.columns))
    counts = non_finite_counts(sample, names)
    if counts:
        raise FeedError(non_finite_message(counts, f"the first {sample.num_rows} rows of {arg}"))


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


def flat_names(cols: Any) -> list[str]:
    """Column names in a feature_cols / label_cols argument (nested lists and dicts
    flattened; resolve_specs checks the form)."""
    if cols is None:
        return []
    if isinstance(cols, str):
        return [cols]
    items = cols.values() if isinstance(cols, Mapping) else cols
    names: list[str] = []
    for item in items:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, (list, tuple)):
            names.extend(name for name in item if isinstance(name, str))
    return list(dict.fromkeys(names))


def fit_workers(spark: Any, num_workers: int | None, batch_size: int) -> int:
    """The ranks of a fit: every free task slot by default, refused when the stage cannot run."""
    from deepspark.context.topology import free_task_slots

    slots, held = free_task_slots(spark)
    if held and (slots == 0 or (num_workers is not None and num_workers > slots)):
        holders = ", ".join(f"{holder} holds {count}" for holder, count in held.items())
        raise ValueError(
            f"num_workers={num_workers}: only {slots} task slot(s) are free ({holders}); a "
            "barrier stage needs all its tasks at once. Lower num_workers, stop what holds "
            "the slots (deepspark.ray.stop()), or add executors/cores"
        )
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
