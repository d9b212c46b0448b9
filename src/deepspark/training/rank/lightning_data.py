"""A Lightning ``DataModule`` over `deepspark.shard` (worker side; needs the lightning extra).

Imported only when ``deepspark.training.ShardDataModule`` is asked for, so lightning stays
optional.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as lightning
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "deepspark.training.ShardDataModule needs PyTorch Lightning: pip install "
        "'deepspark[lightning]' (or lightning>=2.4)"
    ) from error

from torch.utils.data import DataLoader

from deepspark.training.rank.shard import ShardDataset, shard
from deepspark.training.run_spec import FrameHandle

__all__ = ["ShardDataModule"]


class ShardDataModule(lightning.LightningDataModule):
    """This rank's share of the run's DataFrames as Lightning's train and validation loaders.

    Build it inside the function `deepspark.run` runs, from the handles it received, and pass
    it to ``Trainer.fit(model, datamodule=...)``. Each epoch reshuffles the training rows; every
    rank takes the same number of steps, so DDP never waits on a rank that ran out of rows.

    Parameters
    ----------
    train : FrameHandle
        The training DataFrame's handle.
    validation : FrameHandle, optional
        The validation DataFrame's handle (read in order, not shuffled).
    **shard_options
        `deepspark.shard`'s arguments: ``feature_cols``, ``label_cols``, ``batch_size``, ...

    Examples
    --------
    >>> import lightning.pytorch as L  # doctest: +SKIP
    >>> def train(train_df, val_df):  # doctest: +SKIP
    ...     data = ShardDataModule(train_df, val_df, feature_cols=[["x"]], label_cols="y",
    ...                            batch_size=64)
    ...     L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3).fit(
    ...         MyModule(), datamodule=data)
    """

    def __init__(
        self, train: FrameHandle, validation: FrameHandle | None = None, **shard_options: Any
    ) -> None:
        super().__init__()
        self.train_handle = train
        self.validation_handle = validation
        self.shard_options = shard_options
        self._train: ShardDataset | None = None
        self._validation: ShardDataset | None = None

    def setup(self, stage: str) -> None:
        # every rank calls setup in the same order: shard's one collective lines up
        if self._train is None:
            self._train = shard(self.train_handle, **self.shard_options)
        if self.validation_handle is not None and self._validation is None:
            options = {**self.shard_options, "shuffle": False}
            self._validation = shard(self.validation_handle, **options)

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "Lightning calls setup() first"
        return DataLoader(self._train, batch_size=None)

    def val_dataloader(self) -> Any:
        if self._validation is None:
            return []
        return DataLoader(self._validation, batch_size=None)
