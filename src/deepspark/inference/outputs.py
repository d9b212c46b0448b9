"""Driver side of ``predict`` for models with several outputs: one column per output.

A model's output on the probe rows (a tensor, or a dict or tuple of tensors) and the
``output_col``, ``output_cols`` and ``output`` arguments become the `OutputColumn` list that
the tasks write: a dict output's columns are named by its keys, a tuple's
``f"{output_col}_{i}"``; ``output_cols`` renames them, ``output`` gives each its kind.
No pyspark here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from deepspark.inference.runtimes import ModelInputError, Outputs
from deepspark.inference.worker import OutputColumn, OutputKind, output_column, resolve_output

__all__ = [
    "OutputArg",
    "OutputColsArg",
    "check_column_names",
    "check_output_cols",
    "output_columns",
    "requested_kinds",
]

OutputKey = str | int
OutputArg = str | OutputKind | Mapping[OutputKey, str | OutputKind]
"""``output=``: one kind for every output, or kinds by output (dict key or tuple position)."""
OutputColsArg = Sequence[str] | Mapping[OutputKey, str] | None
"""``output_cols=``: a name per output in order, or new names by output."""


def requested_kinds(output: OutputArg) -> tuple[OutputKind, dict[OutputKey, OutputKind]]:
    """``output=``: one kind for every output, or a dict of kinds by output key."""
    if isinstance(output, Mapping):
        by_key = {}
        for key, kind in output.items():
            _check_output_key("output", key)
            by_key[key] = OutputKind.parse(kind)
        return OutputKind.AUTO, by_key
    return OutputKind.parse(output), {}


def _check_output_key(option: str, key: Any) -> None:
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return
    raise ValueError(
        f"{option}: {key!r} names no model output; use a dict output's key (a str) or a tuple "
        "output's position (an int)"
    )


def check_output_cols(output_cols: OutputColsArg) -> None:
    if output_cols is None:
        return
    if isinstance(output_cols, Mapping):
        for key, name in output_cols.items():
            _check_output_key("output_cols", key)
            if not isinstance(name, str) or not name:
                raise ValueError(f"output_cols[{key!r}]={name!r}: give a column name")
        return
    if isinstance(output_cols, str) or not all(
        isinstance(name, str) and name for name in output_cols
    ):
        raise ValueError(
            f"output_cols={output_cols!r}: give a list of column names, one per model output, "
            "or a dict output -> column name"
        )


def output_columns(
    probe: Outputs | None,
    rows: int,
    output_col: str,
    output_cols: OutputColsArg,
    requested: OutputKind,
    requested_by_key: Mapping[OutputKey, OutputKind],
) -> tuple[OutputColumn, ...]:
    """One prediction column per model output: its key, name and (resolved) kind."""
    if probe is None:
        keys = _keys_without_rows(output_cols)
        tensors: list[torch.Tensor | None] = [None] * len(keys)
    elif isinstance(probe, dict):
        keys, tensors = list(probe), list(probe.values())
    elif isinstance(probe, tuple):
        keys, tensors = list(range(len(probe))), list(probe)
    else:
        keys, tensors = [None], [probe]
    names = _column_names(keys, output_col, output_cols)
    unknown = [key for key in requested_by_key if key not in keys]
    if unknown:
        raise ValueError(f"output: {unknown} name no model output; {_outputs_text(keys)}")
    columns = []
    for key, name, tensor in zip(keys, names, tensors, strict=True):
        kind = requested_by_key.get(key, requested) if key is not None else requested
        if tensor is None:
            if kind is OutputKind.AUTO:
                warnings.warn(
                    "predict: the DataFrame has no rows, so output='auto' cannot see the "
                    "model's output; it writes 'array'. Pass output= to choose the column type",
                    stacklevel=3,
                )
                kind = OutputKind.ARRAY
        else:
            try:
                kind = resolve_output(kind, tuple(tensor.shape))
                output_column(tensor, kind, rows)  # the column converts as declared
            except ModelInputError as error:
                if key is None:
                    raise
                raise ModelInputError(f"model output {key!r}: {error}") from None
        columns.append(OutputColumn(key, name, kind))
    return tuple(columns)


def _keys_without_rows(output_cols: OutputColsArg) -> list[Any]:
    """Without rows the model's outputs are unseen: ``output_cols`` says what they are."""
    if output_cols is None:
        return [None]
    if isinstance(output_cols, Mapping):
        return list(output_cols)
    return [None] if len(output_cols) == 1 else list(range(len(output_cols)))


def _column_names(keys: list[Any], output_col: str, output_cols: OutputColsArg) -> list[str]:
    if keys == [None]:
        if output_cols is None:
            return [output_col]
        if not isinstance(output_cols, Mapping) and len(output_cols) == 1:
            return [output_cols[0]]
        raise ValueError(
            f"output_cols={output_cols!r} names several outputs, but the model returns one "
            "tensor; name its column with output_col="
        )
    names = [key if isinstance(key, str) else f"{output_col}_{key}" for key in keys]
    if output_cols is None:
        return names
    if isinstance(output_cols, Mapping):
        unknown = [key for key in output_cols if key not in keys]
        if unknown:
            raise ValueError(f"output_cols: {unknown} name no model output; {_outputs_text(keys)}")
        return [output_cols.get(key, name) for key, name in zip(keys, names, strict=True)]
    if len(output_cols) != len(keys):
        raise ValueError(
            f"output_cols names {len(output_cols)} columns, but {_outputs_text(keys)}; give "
            "one name per output, or a dict to rename some"
        )
    return list(output_cols)


def _outputs_text(keys: list[Any]) -> str:
    if keys == [None]:
        return "the model returns one tensor"
    if all(isinstance(key, str) for key in keys):
        return f"the model returns a dict with keys {keys}"
    return f"the model returns {len(keys)} outputs (positions 0 to {len(keys) - 1})"


def check_column_names(
    outputs: Sequence[OutputColumn],
    existing: Sequence[str],
    output_cols: OutputColsArg,
) -> None:
    names = [out.column for out in outputs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"output_cols: the prediction columns {duplicates} would repeat")
    for out in outputs:
        if out.column in existing:
            option = "output_col" if out.key is None and output_cols is None else "output_cols"
            if option == "output_col":
                what = f"output_col={out.column!r}"
            else:
                what = f"the prediction column {out.column!r} (model output {out.key!r})"
            raise ValueError(
                f"{what} already exists in the DataFrame; choose another name with "
                f"{option}= or drop the column first"
            )
