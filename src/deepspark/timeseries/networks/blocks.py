"""Layers shared by several forecasting networks: a reversible per-window normalisation, a
seasonal-naive starting point, an MLP stack, and the linear head that lets channel-independent
networks use extra features."""

from __future__ import annotations

import torch
from torch import nn


class WindowNormalized(nn.Module):
    """Wrap a network so that it sees every window's targets at mean 0 and standard deviation 1.

    The mean and deviation of each window's target channels (the first ``output_size`` input
    channels) are taken out before ``network`` runs and put back into its forecast. One global
    model then serves series of very different levels and scales (the idea of RevIN, Kim et
    al., 2022); extra feature channels pass through unchanged.
    """

    def __init__(self, network: nn.Module, *, input_size: int, output_size: int) -> None:
        super().__init__()
        self.network = network
        self.output_size = output_size
        self.has_features = input_size > output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        targets = x[..., : self.output_size]
        mean = targets.mean(dim=1, keepdim=True)
        std = torch.sqrt(((targets - mean) ** 2).mean(dim=1, keepdim=True) + 1e-5)
        normalized = (targets - mean) / std
        if self.has_features:
            normalized = torch.cat([normalized, x[..., self.output_size :]], dim=-1)
        return self.network(normalized) * std + mean


class SeasonalNaive(nn.Module):
    """The seasonal-naive forecast: the window's last ``season`` target steps, repeated over
    the horizon (``season=1``: the last value). No weights."""

    def __init__(self, *, season: int, lookback: int, horizon: int, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size
        # Step h of the horizon repeats step (lookback - season + h % season) of the window.
        repeat = lookback - season + torch.arange(horizon) % season
        self.register_buffer("repeat", repeat, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.repeat, : self.output_size]


class SeasonalResidual(nn.Module):
    """Wrap a network so that it forecasts a correction to the seasonal-naive forecast.

    The seasonal-naive forecast (`SeasonalNaive`) is added to ``network``'s output, scaled
    by a learnt gate that starts at zero. Training then starts from the forecast that is hard
    to beat on short, strongly seasonal series (a few days of half-hourly data) and learns
    only what improves on it.
    """

    def __init__(
        self, network: nn.Module, *, season: int, lookback: int, horizon: int, output_size: int
    ) -> None:
        super().__init__()
        self.network = network
        self.naive = SeasonalNaive(
            season=season, lookback=lookback, horizon=horizon, output_size=output_size
        )
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.naive(x) + self.gate * self.network(x)


def mlp(in_features: int, hidden_size: int, num_layers: int, dropout: float) -> nn.Sequential:
    """``num_layers`` Linear+ReLU(+Dropout) layers, the first taking ``in_features``."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        layers.append(nn.Linear(in_features if index == 0 else hidden_size, hidden_size))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class FeatureHead(nn.Module):
    """A linear map from the window's extra feature channels to a forecast correction.

    Starts at zero, so a channel-independent network behaves as if there were no features
    until training finds them useful.
    """

    def __init__(self, *, lookback: int, horizon: int, input_size: int, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size
        self.horizon = horizon
        self.linear = nn.Linear(lookback * (input_size - output_size), horizon * output_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x[..., self.output_size :].reshape(x.shape[0], -1)
        return self.linear(features).reshape(x.shape[0], self.horizon, self.output_size)
