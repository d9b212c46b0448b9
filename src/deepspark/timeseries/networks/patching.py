"""PatchTST (Nie et al., 2023): each target channel cut into overlapping patches, the patches
embedded as tokens of a small Transformer encoder, the encoded tokens flattened to the horizon."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepspark.timeseries.networks.blocks import FeatureHead


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and feed-forward, written out in plain ops so that it exports to
    ONNX the same way in training and evaluation mode."""

    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_size = d_model // n_heads
        self.attention_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.project = nn.Linear(d_model, d_model)
        self.feedforward_norm = nn.LayerNorm(d_model)
        self.feedforward = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        qkv = self.qkv(self.attention_norm(tokens))
        qkv = qkv.reshape(batch, length, 3, self.n_heads, self.head_size).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(self.head_size), dim=-1)
        attended = (self.dropout(weights) @ value).transpose(1, 2).reshape(batch, length, width)
        tokens = tokens + self.dropout(self.project(attended))
        return tokens + self.dropout(self.feedforward(self.feedforward_norm(tokens)))


class PatchTSTNetwork(nn.Module):
    """Channel-independent patch Transformer; extra feature channels enter through a linear
    :class:`FeatureHead`."""

    def __init__(
        self,
        *,
        lookback: int,
        horizon: int,
        input_size: int,
        output_size: int,
        patch_len: int,
        stride: int,
        d_model: int,
        n_heads: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.horizon = horizon
        self.stride = stride
        # As in the paper, the window is extended by `stride` copies of its last value, so the
        # newest values open a patch of their own.
        num_patches = (lookback + stride - patch_len) // stride + 1
        starts = torch.arange(num_patches) * stride
        self.register_buffer("patch_index", starts[:, None] + torch.arange(patch_len)[None, :])
        self.embed = nn.Linear(patch_len, d_model)
        self.position = nn.Parameter(torch.randn(num_patches, d_model) * 0.02)
        self.layers = nn.Sequential(
            *(EncoderLayer(d_model, n_heads, dim_feedforward, dropout) for _ in range(num_layers))
        )
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_patches * d_model, horizon)
        self.features = (
            FeatureHead(
                lookback=lookback, horizon=horizon, input_size=input_size, output_size=output_size
            )
            if input_size > output_size
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        series = x[..., : self.output_size].transpose(1, 2)
        series = F.pad(series, (0, self.stride), mode="replicate")
        series = series.reshape(batch * self.output_size, -1)
        patches = series[:, self.patch_index]
        tokens = self.dropout(self.embed(patches) + self.position)
        tokens = self.norm(self.layers(tokens))
        forecast = self.head(tokens.reshape(tokens.shape[0], -1))
        forecast = forecast.reshape(batch, self.output_size, self.horizon).transpose(1, 2)
        if self.features is not None:
            forecast = forecast + self.features(x)
        return forecast
