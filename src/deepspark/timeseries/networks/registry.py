"""``build_network``: a forecasting network by kind name, with per-kind size hyperparameters."""

from __future__ import annotations

from typing import Any

from torch import nn

from deepspark.timeseries.networks.basis import NBeatsNetwork, NHitsNetwork
from deepspark.timeseries.networks.blocks import SeasonalResidual, WindowNormalized
from deepspark.timeseries.networks.convolutional import TCNNetwork
from deepspark.timeseries.networks.decomposition import DLinearNetwork
from deepspark.timeseries.networks.patching import PatchTSTNetwork
from deepspark.timeseries.networks.recurrent import LSTMNetwork, Seq2SeqNetwork

# Each kind's size hyperparameters and their defaults. ``None`` means "chosen from the window":
# DLinear's moving-average kernel and PatchTST's patch length and stride.
SIZES: dict[str, dict[str, Any]] = {
    "lstm": {"hidden_size": 64, "num_layers": 2, "dropout": 0.1},
    "tcn": {"num_channels": 32, "num_levels": 4, "kernel_size": 3, "dropout": 0.1},
    "seq2seq": {"hidden_size": 64, "num_layers": 1, "dropout": 0.1},
    "nbeats": {
        "num_stacks": 2,
        "num_blocks": 3,
        "hidden_size": 128,
        "num_layers": 3,
        "dropout": 0.0,
    },
    "dlinear": {"kernel_size": None},
    "patchtst": {
        "patch_len": None,
        "stride": None,
        "d_model": 64,
        "n_heads": 4,
        "num_layers": 2,
        "dim_feedforward": 128,
        "dropout": 0.1,
    },
    "nhits": {
        "pool_sizes": (4, 2, 1),
        "downsample": (4, 2, 1),
        "num_blocks": 1,
        "hidden_size": 128,
        "num_layers": 2,
        "dropout": 0.0,
    },
}
NETWORK_KINDS: tuple[str, ...] = tuple(SIZES)
# Every kind also takes ``normalize`` (default True, :class:`WindowNormalized`) and ``season``
# (default None; a period in steps makes the network correct the seasonal-naive forecast,
# :class:`SeasonalResidual`).
COMMON_SIZES: dict[str, Any] = {"normalize": True, "season": None}


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def build_network(
    kind: str, *, lookback: int, horizon: int, input_size: int = 1, output_size: int = 1, **sizes
) -> nn.Module:
    """A network mapping ``(batch, lookback, input_size)`` windows to ``(batch, horizon,
    output_size)`` forecasts.

    Parameters
    ----------
    kind : str
        One of :data:`NETWORK_KINDS`: ``"lstm"``, ``"tcn"``, ``"seq2seq"``, ``"nbeats"``,
        ``"dlinear"``, ``"patchtst"``, ``"nhits"``.
    lookback, horizon : int
        Past steps read and future steps forecast.
    input_size : int
        Channels per step: the targets first, then extra features.
    output_size : int
        Target channels (the first ``output_size`` input channels).
    **sizes
        The kind's size hyperparameters (see ``SIZES[kind]`` for names and defaults), and
        ``normalize``: take each window's target mean and deviation out before the network and
        put them back into the forecast (default True; one global model then fits series of any
        level). ``season``: a period in steps (at most `lookback`); the network then forecasts a
        correction to the seasonal-naive forecast (the window's last season repeated), starting
        from none (default None: the network forecasts alone).

    Returns
    -------
    torch.nn.Module
        A float32 module that exports to ONNX (opset 17+) and pickles with cloudpickle.

    Raises
    ------
    ValueError
        For an unknown kind or size name, or sizes that do not fit the window.

    Examples
    --------
    >>> import torch
    >>> net = build_network("dlinear", lookback=24, horizon=6)
    >>> net(torch.randn(8, 24, 1)).shape
    torch.Size([8, 6, 1])
    """
    if kind not in SIZES:
        raise ValueError(f"kind={kind!r} is not a network kind; use one of {list(NETWORK_KINDS)}")
    for name, value in (
        ("lookback", lookback),
        ("horizon", horizon),
        ("input_size", input_size),
        ("output_size", output_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: give a positive int")
    if output_size > input_size:
        raise ValueError(
            f"output_size={output_size} > input_size={input_size}: the targets are the first "
            "output_size input channels, so input_size must count them too"
        )
    valid = {**SIZES[kind], **COMMON_SIZES}
    unknown = sorted(set(sizes) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown size name(s) {unknown} for kind={kind!r}; valid names: {sorted(valid)}"
        )
    chosen = {**valid, **sizes}
    normalize = bool(chosen.pop("normalize"))
    season = chosen.pop("season")
    if season is not None and (
        not isinstance(season, int) or isinstance(season, bool) or not 1 <= season <= lookback
    ):
        raise ValueError(
            f"season={season!r}: give a period in steps from 1 to lookback={lookback} (the "
            "window must hold one season), or None"
        )
    window = {
        "lookback": lookback,
        "horizon": horizon,
        "input_size": input_size,
        "output_size": output_size,
    }
    network = _build(kind, window, _checked(kind, chosen, lookback))
    if season is not None:
        network = SeasonalResidual(
            network, season=season, lookback=lookback, horizon=horizon, output_size=output_size
        )
    if normalize:
        network = WindowNormalized(network, input_size=input_size, output_size=output_size)
    return network


def _checked(kind: str, sizes: dict[str, Any], lookback: int) -> dict[str, Any]:
    """Fill in window-dependent defaults and refuse sizes that cannot work."""
    if kind == "dlinear" and sizes["kernel_size"] is None:
        sizes["kernel_size"] = min(25, lookback)
    if kind == "patchtst":
        if sizes["patch_len"] is None:
            sizes["patch_len"] = min(16, lookback)
        if sizes["stride"] is None:
            sizes["stride"] = max(1, sizes["patch_len"] // 2)
        if sizes["patch_len"] > lookback:
            raise ValueError(
                f"patch_len={sizes['patch_len']} is longer than lookback={lookback}: "
                "give a smaller patch_len or a longer lookback"
            )
        if sizes["d_model"] % sizes["n_heads"]:
            raise ValueError(
                f"d_model={sizes['d_model']} is not a multiple of n_heads={sizes['n_heads']}"
            )
    if kind == "nhits":
        sizes["pool_sizes"] = tuple(sizes["pool_sizes"])
        sizes["downsample"] = tuple(sizes["downsample"])
        if len(sizes["pool_sizes"]) != len(sizes["downsample"]):
            raise ValueError(
                f"pool_sizes={sizes['pool_sizes']} and downsample={sizes['downsample']} need "
                "one entry per stack each"
            )
    for name, value in sizes.items():
        if name == "dropout":
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"dropout={value!r}: give a float in [0, 1)")
        elif isinstance(value, tuple):
            if not value or not all(isinstance(v, int) and v >= 1 for v in value):
                raise ValueError(f"{name}={value!r}: give a non-empty tuple of positive ints")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} for kind={kind!r}: give a positive int")
    return sizes


def _build(kind: str, window: dict[str, int], sizes: dict[str, Any]) -> nn.Module:
    without_lookback = {k: v for k, v in window.items() if k != "lookback"}
    if kind == "lstm":
        return LSTMNetwork(**without_lookback, **sizes)
    if kind == "seq2seq":
        return Seq2SeqNetwork(**without_lookback, **sizes)
    if kind == "tcn":
        return TCNNetwork(**without_lookback, **sizes)
    if kind == "nbeats":
        return NBeatsNetwork(**window, **sizes)
    if kind == "nhits":
        return NHitsNetwork(**window, **sizes)
    if kind == "dlinear":
        return DLinearNetwork(**window, **sizes)
    return PatchTSTNetwork(**window, **sizes)
