"""Time series on Spark: TSDataset preparation, forecasters, AutoTS and anomaly detection.

`TSDataset` holds many series in long format (pandas or Spark); the forecasters train one
global network over all of them with deepspark's distributed engine.
"""

from deepspark.timeseries.anomaly import ThresholdDetector
from deepspark.timeseries.anomaly_models import AEDetector, ForecastResidualDetector
from deepspark.timeseries.autots import AutoTS
from deepspark.timeseries.baseline import SeasonalNaiveForecaster
from deepspark.timeseries.ensemble import EnsembleForecaster
from deepspark.timeseries.forecast_metrics import mae, mase, mse, smape
from deepspark.timeseries.forecaster import (
    DLinearForecaster,
    Forecaster,
    LSTMForecaster,
    NBeatsForecaster,
    NHitsForecaster,
    PatchTSTForecaster,
    Seq2SeqForecaster,
    TCNForecaster,
)
from deepspark.timeseries.networks import NETWORK_KINDS, build_network
from deepspark.timeseries.pipeline import TSPipeline
from deepspark.timeseries.scaler import TSScaler
from deepspark.timeseries.statistical import StatsForecaster
from deepspark.timeseries.tsdataset import TSDataset

__all__ = [
    "NETWORK_KINDS",
    "AEDetector",
    "AutoTS",
    "DLinearForecaster",
    "EnsembleForecaster",
    "ForecastResidualDetector",
    "Forecaster",
    "LSTMForecaster",
    "NBeatsForecaster",
    "NHitsForecaster",
    "PatchTSTForecaster",
    "SeasonalNaiveForecaster",
    "Seq2SeqForecaster",
    "StatsForecaster",
    "TCNForecaster",
    "TSDataset",
    "TSPipeline",
    "TSScaler",
    "ThresholdDetector",
    "build_network",
    "mae",
    "mase",
    "mse",
    "smape",
]
