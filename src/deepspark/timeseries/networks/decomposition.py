"""DLinear (Zeng et al., 2023): the window split into a moving-average trend and the remainder,
each mapped to the horizon by one linear layer shared by all target channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepspark.timeseries.networks.blocks import FeatureHead


class DLinearNetwork(nn.Module):
    """Trend and seasonal linear maps over time, applied to each target channel alone; extra
    feature channels enter through a linear :class:`FeatureHead`."""

    def __init__(
        self, *, lookback: int, horizon: int, input_size: int, output_size: int, kernel_size: int
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.kernel_size = kernel_size
        self.trend = nn.Linear(lookback, horizon)
        self.seasonal = nn.Linear(lookback, horizon)
        self.features = (
            FeatureHead(
                lookback=lookback, horizon=horizon, input_size=input_size, output_size=output_size
            )
            if input_size > output_size
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        series = x[..., : self.output_size].transpose(1, 2)
        padded = F.pad(series, self.pad, mode="replicate")
        trend = F.avg_pool1d(padded, self.kernel_size, stride=1)
        forecast = (self.trend(trend) + self.seasonal(series - trend)).transpose(1, 2)
        if self.features is not None:
            forecast = forecast + self.features(x)
        return forecast
