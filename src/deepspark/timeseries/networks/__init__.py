"""Forecasting networks for :mod:`deepspark.timeseries`: torch modules mapping
``(batch, lookback, input_size)`` windows to ``(batch, horizon, output_size)`` forecasts."""

from deepspark.timeseries.networks.registry import NETWORK_KINDS, SIZES, build_network

__all__ = ["NETWORK_KINDS", "SIZES", "build_network"]
