"""The forecasting networks of deepspark.timeseries: shapes, ONNX export, size checks, and that
each one learns a real series (statsmodels' Mauna Loa CO2) better than a naive forecast."""

from __future__ import annotations

import os

import cloudpickle
import numpy as np
import pytest
import torch

from deepspark.inference import export_onnx
from deepspark.timeseries.networks import NETWORK_KINDS, SIZES, build_network

LOOKBACK, HORIZON = 48, 8
# Small sizes keep the learning check quick on 2 cores.
SMALL_SIZES = {
    "lstm": {"hidden_size": 32, "num_layers": 1},
    "seq2seq": {"hidden_size": 32},
    "tcn": {"num_channels": 16, "num_levels": 3},
    "nbeats": {"hidden_size": 64, "num_blocks": 2, "num_layers": 2},
    "patchtst": {"d_model": 32, "num_layers": 1, "dim_feedforward": 64},
    "nhits": {"hidden_size": 64},
}


def test_network_kinds_cover_the_contract():
    assert set(NETWORK_KINDS) >= {"lstm", "tcn", "seq2seq", "nbeats", "dlinear", "patchtst"}


@pytest.mark.parametrize("kind", NETWORK_KINDS)
@pytest.mark.parametrize(("input_size", "output_size"), [(1, 1), (4, 2)])
def test_network_maps_windows_to_horizon(kind, input_size, output_size):
    torch.manual_seed(0)
    net = build_network(
        kind, lookback=30, horizon=7, input_size=input_size, output_size=output_size
    )
    x = torch.randn(5, 30, input_size)
    forecast = net(x)
    assert forecast.shape == (5, 7, output_size)
    assert forecast.dtype == torch.float32
    assert torch.isfinite(forecast).all()
    # Shipped to Spark tasks with cloudpickle: the copy computes the same forecasts.
    net.eval()
    copy = cloudpickle.loads(cloudpickle.dumps(net))
    torch.testing.assert_close(copy(x), net(x))


@pytest.mark.parametrize("kind", NETWORK_KINDS)
@pytest.mark.parametrize("input_size", [1, 3])
def test_every_parameter_gets_a_gradient(kind, input_size):
    # DistributedDataParallel stalls on a parameter the loss never reaches.
    net = build_network(kind, lookback=24, horizon=4, input_size=input_size, output_size=1)
    net(torch.randn(3, 24, input_size)).sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


# Slow tier: the fast tier exports every kind to ONNX already, seasonal, and runs it on a batch
# size the export never saw (test_seasonal_network_starts_at_the_seasonal_naive_forecast_and_
# exports); this one adds several inputs and outputs.
@pytest.mark.slow
@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_network_exports_to_onnx_with_free_batch(kind, tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    net = build_network(kind, lookback=24, horizon=5, input_size=3, output_size=2).eval()
    path = export_onnx(net, os.path.join(tmp_path, f"{kind}.onnx"), torch.randn(4, 24, 3))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(9, 24, 3)  # a batch size the export never saw
    (onnx_forecast,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = net(x).numpy()
    assert onnx_forecast.shape == (9, 5, 2)
    np.testing.assert_allclose(onnx_forecast, expected, atol=1e-4, rtol=1e-3)


def test_unknown_size_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"hidden_sise.*valid names.*hidden_size"):
        build_network("lstm", lookback=10, horizon=2, hidden_sise=8)
    with pytest.raises(ValueError, match="d_model"):
        build_network("dlinear", lookback=10, horizon=2, d_model=8)


@pytest.mark.parametrize(
    ("kind", "arguments", "message"),
    [
        ("transformer", {}, "one of"),
        ("lstm", {"lookback": 0}, "lookback=0"),
        ("lstm", {"input_size": 1, "output_size": 2}, "output_size=2 > input_size=1"),
        ("lstm", {"dropout": 1.5}, "dropout=1.5"),
        ("tcn", {"num_channels": 0}, "num_channels=0"),
        ("patchtst", {"patch_len": 40}, "patch_len=40 is longer than lookback=10"),
        ("patchtst", {"d_model": 30, "n_heads": 4}, "multiple of n_heads"),
        ("nhits", {"pool_sizes": (2, 1), "downsample": (1,)}, "one entry per stack"),
        ("dlinear", {"season": 12}, "season=12: give a period in steps from 1 to lookback=10"),
        ("lstm", {"season": 0}, "season=0"),
    ],
)
def test_bad_sizes_raise_with_the_argument_named(kind, arguments, message):
    window = {"lookback": 10, "horizon": 2, **arguments}
    with pytest.raises(ValueError, match=message):
        build_network(kind, **window)


def test_every_kind_has_documented_sizes():
    for kind in NETWORK_KINDS:
        net = build_network(kind, lookback=20, horizon=4, **SIZES[kind])
        assert net(torch.randn(2, 20, 1)).shape == (2, 4, 1)


def _co2_windows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weekly Mauna Loa CO2 (statsmodels), rolled into windows; the last 20% for testing."""
    import statsmodels.api as sm

    series = sm.datasets.co2.load_pandas().data["co2"].interpolate().to_numpy(np.float32)
    steps = LOOKBACK + HORIZON
    windows = np.lib.stride_tricks.sliding_window_view(series, steps)[::4]
    split = int(len(windows) * 0.8)
    x = torch.from_numpy(windows[:, :LOOKBACK, None].copy())
    y = torch.from_numpy(windows[:, LOOKBACK:, None].copy())
    return x[:split], y[:split], x[split:], y[split:]


@pytest.fixture(scope="module")
def co2_windows():
    return _co2_windows()


@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_network_beats_naive_forecast_on_co2(kind, co2_windows):
    train_x, train_y, test_x, test_y = co2_windows
    torch.manual_seed(0)
    net = build_network(kind, lookback=LOOKBACK, horizon=HORIZON, **SMALL_SIZES.get(kind, {}))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for batch in torch.randperm(len(train_x), generator=generator).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.l1_loss(net(train_x[batch]), train_y[batch])
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        network_error = (net(test_x) - test_y).abs().mean().item()
    naive_error = (test_x[:, -1:, :] - test_y).abs().mean().item()
    # CO2 has a yearly cycle of about 6 ppm: a network that learnt it is far closer than
    # repeating the last value.
    assert network_error < 0.6 * naive_error, (kind, network_error, naive_error)


@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_seasonal_network_starts_at_the_seasonal_naive_forecast_and_exports(kind, tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    season, horizon = 7, 10  # a horizon longer than the season repeats it
    net = build_network(
        kind, lookback=21, horizon=horizon, input_size=2, output_size=1, season=season
    ).eval()
    x = torch.randn(6, 21, 2) * 5 + 3
    repeated = x[:, [21 - season + step % season for step in range(horizon)], :1]
    with torch.no_grad():
        torch.testing.assert_close(net(x), repeated, atol=1e-4, rtol=1e-4)
    # the correction is learnt: every parameter gets a gradient once the gate is open
    net.train()
    with torch.no_grad():
        net.network.gate.fill_(0.5)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    path = export_onnx(net.eval(), os.path.join(tmp_path, "seasonal.onnx"), x[:2])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (onnx_forecast,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_forecast, net(x).numpy(), atol=1e-4, rtol=1e-3)
