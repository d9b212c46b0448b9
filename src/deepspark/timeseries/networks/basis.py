"""Doubly residual MLP forecasters: N-BEATS (Oreshkin et al., 2020; the generic variant) and
N-HiTS (Challu et al., 2023), whose blocks read a max-pooled window and forecast a few
coefficients interpolated to the horizon, each stack at its own time scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepspark.timeseries.networks.blocks import mlp


class BasisBlock(nn.Module):
    """An MLP over the (pooled, flattened) window giving a backcast of the full window and
    ``coefficients`` forecast values per target. The last block of a network has no backcast
    (``backcast_size=None``): nothing would read it, and a parameter without a gradient
    stalls DistributedDataParallel."""

    def __init__(
        self,
        *,
        in_features: int,
        backcast_size: int | None,
        coefficients: int,
        output_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.body = mlp(in_features, hidden_size, num_layers, dropout)
        self.backcast = None if backcast_size is None else nn.Linear(hidden_size, backcast_size)
        self.forecast = nn.Linear(hidden_size, coefficients * output_size)

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        hidden = self.body(flat)
        backcast = None if self.backcast is None else self.backcast(hidden)
        return backcast, self.forecast(hidden)


class NBeatsNetwork(nn.Module):
    """Blocks in sequence, each removing what it explains from the window (its backcast) and
    adding its forecast to the sum."""

    def __init__(
        self,
        *,
        lookback: int,
        horizon: int,
        input_size: int,
        output_size: int,
        num_stacks: int,
        num_blocks: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.output_size = output_size
        window = lookback * input_size
        count = num_stacks * num_blocks
        self.blocks = nn.ModuleList(
            BasisBlock(
                in_features=window,
                backcast_size=window if number < count - 1 else None,
                coefficients=horizon,
                output_size=output_size,
                hidden_size=hidden_size,
                num_layers=num_layers,
                dropout=dropout,
            )
            for number in range(count)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x.reshape(x.shape[0], -1)
        forecast = torch.zeros_like(residual[:, :1])
        for block in self.blocks:
            backcast, block_forecast = block(residual)
            if backcast is not None:
                residual = residual - backcast
            forecast = forecast + block_forecast
        return forecast.reshape(x.shape[0], self.horizon, self.output_size)


def _interpolation(coefficients: int, horizon: int) -> torch.Tensor:
    """The (coefficients, horizon) matrix that linearly interpolates evenly spaced knots."""
    if coefficients == 1:
        return torch.ones(1, horizon)
    knots = torch.linspace(0, coefficients - 1, horizon)
    lower = knots.floor().clamp(max=coefficients - 2).long()
    upper_weight = knots - lower
    matrix = torch.zeros(coefficients, horizon)
    columns = torch.arange(horizon)
    matrix[lower, columns] = 1 - upper_weight
    matrix[lower + 1, columns] = upper_weight
    return matrix


class NHitsNetwork(nn.Module):
    """One stack per pooling size: its blocks see the window max-pooled by that size and
    forecast ``horizon // downsample`` knots, linearly interpolated to the horizon."""

    def __init__(
        self,
        *,
        lookback: int,
        horizon: int,
        input_size: int,
        output_size: int,
        pool_sizes: tuple[int, ...],
        downsample: tuple[int, ...],
        num_blocks: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.output_size = output_size
        self.input_size = input_size
        self.pool_sizes: list[int] = []
        blocks = []
        count = len(pool_sizes) * num_blocks
        for pool_size, ratio in zip(pool_sizes, downsample, strict=True):
            coefficients = max(1, horizon // ratio)
            pooled_steps = -(-lookback // pool_size)
            for _ in range(num_blocks):
                self.pool_sizes.append(pool_size)
                block = BasisBlock(
                    in_features=pooled_steps * input_size,
                    backcast_size=lookback * input_size if len(blocks) < count - 1 else None,
                    coefficients=coefficients,
                    output_size=output_size,
                    hidden_size=hidden_size,
                    num_layers=num_layers,
                    dropout=dropout,
                )
                block.register_buffer("interpolation", _interpolation(coefficients, horizon))
                blocks.append(block)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        residual = x
        forecast = x.new_zeros(batch, self.output_size, self.horizon)
        for pool_size, block in zip(self.pool_sizes, self.blocks, strict=True):
            channels = residual.transpose(1, 2)
            if pool_size > 1:
                channels = F.max_pool1d(channels, pool_size, pool_size, ceil_mode=True)
            backcast, knots = block(channels.reshape(batch, -1))
            if backcast is not None:
                residual = residual - backcast.reshape(residual.shape)
            knots = knots.reshape(batch, self.output_size, -1)
            forecast = forecast + knots @ block.interpolation
        return forecast.transpose(1, 2)
