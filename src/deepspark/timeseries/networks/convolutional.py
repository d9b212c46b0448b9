"""Temporal convolutional network (Bai et al., 2018): residual blocks of dilated causal
convolutions, the dilation doubling per level so the receptive field covers the window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalBlock(nn.Module):
    """Two dilated causal convolutions with ReLU and dropout, plus a residual connection."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, dropout: float
    ) -> None:
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.first = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)
        self.second = nn.Conv1d(out_channels, out_channels, kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(torch.relu(self.first(F.pad(x, (self.left_pad, 0)))))
        y = self.dropout(torch.relu(self.second(F.pad(y, (self.left_pad, 0)))))
        residual = x if self.skip is None else self.skip(x)
        return torch.relu(y + residual)


class TCNNetwork(nn.Module):
    """Stacked causal blocks; the last time step's channels predict the whole horizon."""

    def __init__(
        self,
        *,
        horizon: int,
        input_size: int,
        output_size: int,
        num_channels: int,
        num_levels: int,
        kernel_size: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.output_size = output_size
        self.blocks = nn.Sequential(
            *(
                CausalBlock(
                    input_size if level == 0 else num_channels,
                    num_channels,
                    kernel_size,
                    2**level,
                    dropout,
                )
                for level in range(num_levels)
            )
        )
        self.head = nn.Linear(num_channels, horizon * output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.blocks(x.transpose(1, 2))
        return self.head(channels[:, :, -1]).reshape(x.shape[0], self.horizon, self.output_size)
