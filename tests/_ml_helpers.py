"""Data and networks shared by the Spark ML stage tests (shipped to Spark workers by value)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer, load_digits

PIXELS = [f"p{i}" for i in range(64)]
CANCER_FEATURES = [f"f{i}" for i in range(30)]


class MLP(torch.nn.Module):
    """inputs -> hidden -> ReLU -> outputs."""

    def __init__(self, inputs: int, outputs: int, hidden: int = 32) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TinyCNN(torch.nn.Module):
    """A one-channel 8x8 image -> 10 class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(x.flatten(1))


def _split(frame: pd.DataFrame, seed: int, train_share: float = 0.8):
    order = np.random.default_rng(seed).permutation(len(frame))
    cut = int(train_share * len(frame))
    return (
        frame.iloc[order[:cut]].reset_index(drop=True),
        frame.iloc[order[cut:]].reset_index(drop=True),
    )


def digits_pixel_pandas(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): `id`, 64 double pixel columns `p0`..`p63`, a double `label`."""
    data = load_digits()
    frame = pd.DataFrame(data.data.astype(np.float64), columns=PIXELS)
    frame.insert(0, "id", np.arange(len(frame), dtype=np.int64))
    frame["label"] = data.target.astype(np.float64)
    return _split(frame, seed)


def digits_pixel_frames(spark, seed: int = 0):
    """`digits_pixel_pandas` as Spark DataFrames."""
    train, test = digits_pixel_pandas(seed)
    return spark.createDataFrame(train), spark.createDataFrame(test)


def cancer_frames(spark, seed: int = 0):
    """(train_df, test_df): `id`, 30 double columns `f0`..`f29`, a string `diagnosis`."""
    data = load_breast_cancer()
    frame = pd.DataFrame(data.data.astype(np.float64), columns=CANCER_FEATURES)
    frame.insert(0, "id", np.arange(len(frame), dtype=np.int64))
    frame["diagnosis"] = np.asarray(data.target_names)[data.target]
    train, test = _split(frame, seed)
    return spark.createDataFrame(train), spark.createDataFrame(test)


def diabetes_frame(spark):
    """`f0`..`f9` and a standardised double `target` (disease progression after a year)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    frame = pd.DataFrame(data.data.astype(np.float64), columns=[f"f{i}" for i in range(10)])
    target = data.target.astype(np.float64)
    frame["target"] = (target - target.mean()) / target.std()
    return spark.createDataFrame(frame)
