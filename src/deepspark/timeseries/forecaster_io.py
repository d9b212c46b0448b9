"""Saving and loading forecasters: settings and column roles as JSON, weights as safetensors.

Nothing here unpickles code: a saved forecaster is rebuilt from its settings with
`build_network`, then its weights are loaded (DESIGN decision 11).
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from deepspark.timeseries.series_ops import SeriesColumns

SETTINGS_FILE, WEIGHTS_FILE = "forecaster.json", "weights.safetensors"
FORMAT_VERSION = 1


def write_forecaster(
    path: str, settings: dict[str, Any], cols: SeriesColumns, weights: dict[str, torch.Tensor]
) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    document = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "columns": {
            "dt_col": cols.dt_col,
            "target_col": list(cols.target_col),
            "id_col": cols.id_col,
            "feature_col": list(cols.feature_col),
        },
    }
    with fs.open(f"{root}/{SETTINGS_FILE}", "w") as handle:
        json.dump(document, handle, indent=2)
    tensors = {name: tensor.detach().contiguous() for name, tensor in weights.items()}
    with fs.open(f"{root}/{WEIGHTS_FILE}", "wb") as handle:
        handle.write(save_tensors(tensors))


def read_json(path: str, name: str, written_by: str) -> Any:
    """The JSON file `name` in directory `path` (any fsspec URL); a clear error when absent."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/{name}"):
        raise FileNotFoundError(f"{path} holds no {name}: give a directory written by {written_by}")
    with fs.open(f"{root}/{name}", "r") as handle:
        return json.load(handle)


def read_forecaster(path: str) -> tuple[dict[str, Any], SeriesColumns, dict[str, torch.Tensor]]:
    fs, root = fsspec.core.url_to_fs(path)
    document = read_json(path, SETTINGS_FILE, "Forecaster.save")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in format {document.get('format_version')}; this deepspark "
            f"reads format {FORMAT_VERSION}"
        )
    columns = document["columns"]
    cols = SeriesColumns(
        columns["dt_col"],
        tuple(columns["target_col"]),
        columns["id_col"],
        tuple(columns["feature_col"]),
    )
    with fs.open(f"{root}/{WEIGHTS_FILE}", "rb") as handle:
        weights = load_tensors(handle.read())
    return document["settings"], cols, weights
