"""Data, models and callbacks shared by the training tests (importable inside Spark tasks)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from deepspark.training.callbacks import Callback


class DigitsNet(torch.nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def digits_arrays(seed: int = 0):
    """Digits scaled to [0, 1], split 80/20 with a fixed permutation."""
    data = load_digits()
    features = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return features[train], labels[train], features[test], labels[test]


def digits_frames(spark, seed: int = 0):
    """(train_df, test_df) with an array<float> `features` column and an int `label` column."""
    import pandas as pd

    train_x, train_y, test_x, test_y = digits_arrays(seed)

    def frame(x, y):
        pdf = pd.DataFrame({"features": list(x.astype(np.float64)), "label": y.astype(np.int64)})
        return spark.createDataFrame(pdf, "features array<double>, label long")

    return frame(train_x, train_y), frame(test_x, test_y)


def train_single_process(epochs: int, batch_size: int, lr: float, seed: int = 0) -> float:
    """The same model trained by plain PyTorch in this process; returns test accuracy."""
    train_x, train_y, test_x, test_y = digits_arrays(seed)
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_x)).argmax(1).numpy()
    return float((predicted == test_y).mean())


class KillRankOnce(Callback):
    """Kills the rank's own Python worker at a given step, once (a marker file remembers)."""

    def __init__(self, marker: str, rank: int = 1, epoch: int = 1, step: int = 3) -> None:
        self.marker, self.rank, self.epoch, self.step = marker, rank, epoch, step

    def on_batch_end(self, state) -> None:
        if (state.rank, state.epoch, state.step) != (self.rank, self.epoch, self.step):
            return
        if Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


class WritePidAt(Callback):
    """Writes the rank's pid to a file at the start of an epoch, then slows down a little so
    that a test can kill the process from outside while it trains."""

    def __init__(self, pid_file: str, rank: int = 1, epoch: int = 1) -> None:
        self.pid_file, self.rank, self.epoch = pid_file, rank, epoch

    def on_epoch_begin(self, state) -> None:
        if (state.rank, state.epoch) == (self.rank, self.epoch) and not Path(
            self.pid_file
        ).exists():
            Path(self.pid_file).write_text(str(os.getpid()))

    def on_batch_end(self, state) -> None:
        if state.epoch == self.epoch:
            import time

            time.sleep(0.05)


class FailingOnRank(DigitsNet):
    """Trains normally on every rank but `rank`, where the first training forward raises."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__()
        self.failing_rank, self.message = rank, message

    def forward(self, x):
        import torch.distributed as dist

        if self.training and dist.is_initialized() and dist.get_rank() == self.failing_rank:
            raise RuntimeError(self.message)
        return super().forward(x)
