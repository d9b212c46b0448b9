"""Recurrent forecasters: an LSTM with a direct multi-step head, and an LSTM encoder-decoder."""

from __future__ import annotations

import torch
from torch import nn


class LSTMNetwork(nn.Module):
    """A stacked LSTM over the window; its last hidden state predicts the whole horizon."""

    def __init__(
        self,
        *,
        horizon: int,
        input_size: int,
        output_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.output_size = output_size
        self.lstm = nn.LSTM(
            input_size,
            hidden_size,
            num_layers=num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(hidden_size, horizon * output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(x)
        return self.head(hidden[:, -1]).reshape(x.shape[0], self.horizon, self.output_size)


class Seq2SeqNetwork(nn.Module):
    """An LSTM encoder reads the window; an LSTM decoder unrolls the horizon one step at a time,
    each step fed the previous step's forecast (the last observed targets at the start)."""

    def __init__(
        self,
        *,
        horizon: int,
        input_size: int,
        output_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.horizon = horizon
        self.output_size = output_size
        between_layers = dropout if num_layers > 1 else 0.0
        self.encoder = nn.LSTM(
            input_size, hidden_size, num_layers, dropout=between_layers, batch_first=True
        )
        self.decoder = nn.LSTM(
            output_size, hidden_size, num_layers, dropout=between_layers, batch_first=True
        )
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(x)
        step_input = x[:, -1:, : self.output_size]
        steps = []
        for _ in range(self.horizon):
            hidden, state = self.decoder(step_input, state)
            step_input = self.head(hidden)
            steps.append(step_input)
        return torch.cat(steps, dim=1)
