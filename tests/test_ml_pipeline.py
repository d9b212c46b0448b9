"""TorchEstimator / TorchModel as Spark ML stages, on real data and real Spark sessions."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap

import cloudpickle
import numpy as np
import pandas as pd
import pytest
import torch
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import (
    BinaryClassificationEvaluator,
    MulticlassClassificationEvaluator,
    RegressionEvaluator,
)
from pyspark.ml.feature import StandardScaler, StringIndexer, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import (
    CrossValidator,
    CrossValidatorModel,
    ParamGridBuilder,
    TrainValidationSplit,
)
from safetensors.torch import load_file

import _ml_helpers as helpers
import deepspark.ml.stages
from _ml_helpers import CANCER_FEATURES, MLP, PIXELS, TinyCNN, cancer_frames, digits_pixel_frames
from deepspark.inference import predict
from deepspark.ml import TorchEstimator, TorchModel

# Spark's Python workers cannot import the tests folder: ship these helpers by value.
cloudpickle.register_pickle_by_value(helpers)

# A fresh Python process (its own JVM and session): load what the test saved, transform, write.
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import deepspark as ds
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.functions import vector_to_array

    pipeline_model_path, pipeline_path, data_path, out_path = sys.argv[1:5]
    spark = ds.init_context(cores=2, app_name="deepspark-ml-fresh-session")
    scored = PipelineModel.load(pipeline_model_path).transform(spark.read.parquet(data_path))
    scored.select(
        "id", "prediction", vector_to_array("probability").alias("probability")
    ).write.parquet(out_path)
    est = Pipeline.load(pipeline_path).getStages()[-1]
    print(json.dumps({
        "class": type(est).__name__,
        "learningRate": est.getLearningRate(),
        "epochs": est.getEpochs(),
        "metrics": est.getMetrics(),
        "model": type(est.getModel()).__name__,
        "loss": type(est.getLoss()).__name__,
        "optimizer": est.getOptimizer().__name__,
        "first_weight": est.getModel().layers[0].weight[0, 0].item(),
    }))
    ds.stop_context()
    """
)


def _digits_pipeline(estimator: TorchEstimator) -> Pipeline:
    return Pipeline(
        stages=[
            VectorAssembler(inputCols=PIXELS, outputCol="raw"),
            StandardScaler(inputCol="raw", outputCol="features"),
            estimator,
        ]
    )


def _accuracy(scored) -> float:
    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(scored)


@pytest.mark.slow
def test_pipeline_is_saved_and_loaded_in_a_fresh_session_and_transforms_identically(
    spark, tmp_path
):
    train_rows, test_rows = helpers.digits_pixel_pandas()
    data_path = str(tmp_path / "test.parquet")
    test_rows.to_parquet(data_path, index=False)  # both sessions read the same rows
    train, test = spark.createDataFrame(train_rows), spark.read.parquet(data_path)
    torch.manual_seed(0)
    net = MLP(64, 10)
    est = TorchEstimator(
        model=net,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam,
        metrics=["accuracy"],
        epochs=4,
        learningRate=3e-3,
        numWorkers=2,
        validationFraction=0.1,
    )
    pipeline = _digits_pipeline(est)
    fitted = pipeline.fit(train)

    stage = fitted.stages[-1]
    assert isinstance(stage, TorchModel)
    assert stage.getLearningRate() == 3e-3 and stage.getEpochs() == 4
    assert stage.getOutputKind() == "class" and not stage.isSet(stage.outputKind)
    assert list(stage.history["epoch"]) == [0, 1, 2, 3]
    assert stage.history["val_accuracy"].iloc[-1] >= 0.85
    # the estimator's network was deep-copied, not trained in place
    assert not torch.equal(net.layers[0].weight, stage.module.layers[0].weight)

    scored = fitted.transform(test)
    types = dict(scored.dtypes)
    assert types["prediction"] == "double" and types["probability"] == "vector"
    assert _accuracy(scored) >= 0.85
    expected = (
        scored.select("id", "prediction", vector_to_array("probability").alias("probability"))
        .toPandas()
        .sort_values("id", ignore_index=True)
    )

    model_path, pipeline_path = str(tmp_path / "fitted"), str(tmp_path / "pipeline")
    fitted.write().save(model_path)
    pipeline.write().save(pipeline_path)
    stage_dir = tmp_path / "fitted" / "stages" / f"2_{stage.uid}"
    weights = load_file(str(stage_dir / "estimator" / "weights.safetensors"))  # no pickle
    assert torch.equal(weights["layers.0.weight"], stage.module.layers[0].weight)

    out_path = str(tmp_path / "fresh.parquet")
    script = tmp_path / "fresh_session.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run(
        [sys.executable, str(script), model_path, pipeline_path, data_path, out_path],
        cwd=tmp_path,  # the tests folder is not importable there: the network came by value
        env={key: value for key, value in os.environ.items() if key != "PYSPARK_PYTHON"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = pd.read_parquet(out_path).sort_values("id", ignore_index=True)
    assert loaded["id"].tolist() == expected["id"].tolist()
    assert loaded["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(
        np.stack(loaded["probability"]), np.stack(expected["probability"]), atol=1e-6
    )
    estimator_params = json.loads(result.stdout.strip().splitlines()[-1])
    assert estimator_params == {
        "class": "TorchEstimator",
        "learningRate": 3e-3,
        "epochs": 4,
        "metrics": ["accuracy"],
        "model": "MLP",
        "loss": "CrossEntropyLoss",
        "optimizer": "Adam",
        "first_weight": pytest.approx(net.layers[0].weight[0, 0].item()),
    }


@pytest.mark.slow
def test_cross_validator_picks_the_better_learning_rate(spark, tmp_path):
    train, test = digits_pixel_frames(spark)
    # scaled once, outside the search: the folds then differ only in our stage's fits
    scaling = _digits_pipeline(TorchEstimator()).getStages()[:2]
    scaler = Pipeline(stages=scaling).fit(train)
    train, test = scaler.transform(train).cache(), scaler.transform(test)
    torch.manual_seed(0)
    est = TorchEstimator(
        model=MLP(64, 10), loss=torch.nn.CrossEntropyLoss(), epochs=3, numWorkers=2
    )
    grid = ParamGridBuilder().addGrid(est.learningRate, [1e-7, 3e-3]).build()
    cv = CrossValidator(
        estimator=est,
        estimatorParamMaps=grid,
        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"),
        numFolds=2,
        seed=0,
    )
    cv_model = cv.fit(train)
    useless, good = cv_model.avgMetrics
    assert good >= 0.75 and useless <= 0.35, cv_model.avgMetrics
    assert cv_model.bestModel.getLearningRate() == 3e-3
    accuracy = _accuracy(cv_model.transform(test))
    assert accuracy >= 0.85
    train.unpersist()

    cv_model.write().save(str(tmp_path / "cv"))
    loaded = CrossValidatorModel.load(str(tmp_path / "cv"))
    assert loaded.avgMetrics == cv_model.avgMetrics
    assert [m[loaded.getEstimator().learningRate] for m in loaded.getEstimatorParamMaps()] == [
        1e-7,
        3e-3,
    ]
    assert _accuracy(loaded.transform(test)) == accuracy


@pytest.mark.slow
def test_cross_validator_with_checkpoint_dir_scores_every_fit_on_its_own(spark, tmp_path):
    train, _ = digits_pixel_frames(spark)
    scaler = Pipeline(stages=_digits_pipeline(TorchEstimator()).getStages()[:2]).fit(train)
    train = scaler.transform(train).cache()

    def search(checkpoint_dir):
        torch.manual_seed(0)
        est = TorchEstimator(
            model=MLP(64, 10), loss=torch.nn.CrossEntropyLoss(), epochs=2, numWorkers=2
        )
        if checkpoint_dir is not None:
            est.setCheckpointDir(checkpoint_dir)
        grid = ParamGridBuilder().addGrid(est.learningRate, [1e-2, 1e-7]).build()
        evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
        cv = CrossValidator(
            estimator=est, estimatorParamMaps=grid, evaluator=evaluator, numFolds=2, seed=0
        )
        return cv.fit(train).avgMetrics

    without = search(None)
    with_checkpoints = search(str(tmp_path / "ckpt"))
    train.unpersist()
    assert with_checkpoints == pytest.approx(without, abs=0.02), (with_checkpoints, without)
    assert with_checkpoints[0] >= 0.75 and with_checkpoints[1] <= 0.35, with_checkpoints
    # one run folder per fit: 2 grid points x 2 folds, and the refit of the best
    runs = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert len(runs) == 5 and all(name.startswith("run-") for name in runs), runs


@pytest.mark.slow
def test_train_validation_split_with_string_indexer_and_binary_evaluator(spark):
    train, test = cancer_frames(spark)
    torch.manual_seed(0)
    est = TorchEstimator(
        model=MLP(30, 2, hidden=16),
        loss=torch.nn.CrossEntropyLoss(),
        epochs=5,
        batchSize=32,
        numWorkers=2,
    )
    pipeline = Pipeline(
        stages=[
            StringIndexer(inputCol="diagnosis", outputCol="label"),
            VectorAssembler(inputCols=CANCER_FEATURES, outputCol="raw"),
            StandardScaler(inputCol="raw", outputCol="features", withMean=True),
            est,
        ]
    )
    tvs = TrainValidationSplit(
        estimator=pipeline,
        estimatorParamMaps=ParamGridBuilder().addGrid(est.learningRate, [1e-7, 1e-2]).build(),
        evaluator=BinaryClassificationEvaluator(rawPredictionCol="probability"),
        trainRatio=0.75,
        seed=0,
    )
    tvs_model = tvs.fit(train)
    useless, good = tvs_model.validationMetrics
    assert good >= 0.97 and good > useless, tvs_model.validationMetrics
    assert tvs_model.bestModel.stages[-1].getLearningRate() == 1e-2

    scored = tvs_model.transform(test)
    indexer = tvs_model.bestModel.stages[0]
    assert indexer.labels == ["benign", "malignant"]
    # a double class id in predictionCol suits both evaluators as it is
    by_class_id = BinaryClassificationEvaluator(rawPredictionCol="prediction")
    assert by_class_id.evaluate(scored) >= 0.9
    assert _accuracy(scored) >= 0.9
    probabilities = scored.select(vector_to_array("probability").alias("p")).toPandas()["p"]
    np.testing.assert_allclose(np.stack(probabilities).sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_regression_loss_writes_a_double_for_the_regression_evaluator(spark):
    frame = helpers.diabetes_frame(spark)
    features = VectorAssembler(inputCols=[f"f{i}" for i in range(10)], outputCol="features")
    data = features.transform(frame)
    torch.manual_seed(0)
    est = TorchEstimator(
        model=MLP(10, 1, hidden=16),
        loss=torch.nn.MSELoss(),
        labelCol="target",
        metrics=["mse"],
        epochs=20,
        batchSize=32,
        learningRate=1e-2,
        numWorkers=2,
    )
    model = est.fit(data)
    assert model.getOutputKind() == "double"
    assert model.history["train_loss"].iloc[-1] < model.history["train_loss"].iloc[0]
    scored = model.transform(data)
    assert dict(scored.dtypes)["prediction"] == "double"
    assert "probability" not in scored.columns
    r2 = RegressionEvaluator(labelCol="target", metricName="r2").evaluate(scored)
    assert r2 >= 0.3, r2


@pytest.mark.slow
def test_feature_shape_feeds_an_assembled_vector_to_a_cnn_as_an_image(spark):
    train, test = digits_pixel_frames(spark)
    assembler = VectorAssembler(inputCols=PIXELS, outputCol="features")
    torch.manual_seed(0)
    est = TorchEstimator(
        model=TinyCNN(),
        loss=torch.nn.CrossEntropyLoss(),
        featureShape=[1, 8, 8],
        epochs=3,
        learningRate=3e-3,
        numWorkers=2,
        probabilityCol="",
    )
    model = est.fit(assembler.transform(train))
    scored = model.transform(assembler.transform(test))
    assert scored.columns == [*assembler.transform(test).columns, "prediction"]
    assert _accuracy(scored) >= 0.8


@pytest.mark.slow
def test_torch_model_wraps_a_trained_network_and_matches_torch(spark, tmp_path):
    torch.manual_seed(0)
    net = MLP(4, 3)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    df = spark.createDataFrame(
        pd.DataFrame({"id": np.arange(40), "x": list(x.astype(np.float64))}),
        "id long, x array<double>",
    )
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()

    arrays = TorchModel(module=net, featuresCol="x").transform(df).toPandas()  # auto: 3 outputs
    assert list(arrays.columns) == ["id", "x", "prediction"]
    np.testing.assert_allclose(np.stack(arrays["prediction"]), logits, atol=1e-5)

    classes = TorchModel(module=net, featuresCol="x", outputKind="class", probabilityCol="p")
    scored = classes.transform(df).select("prediction", vector_to_array("p").alias("p"))
    got = scored.toPandas()
    assert got["prediction"].tolist() == logits.argmax(1).astype(float).tolist()
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(np.stack(got["p"]), softmax, atol=1e-5)

    path = str(tmp_path / "wrapped")
    classes.write().save(path)
    with pytest.raises(FileExistsError, match=r"write\(\)\.overwrite\(\)\.save"):
        classes.write().save(path)
    classes.write().overwrite().save(path)
    loaded = TorchModel.load(path)
    assert loaded.uid == classes.uid and loaded.getProbabilityCol() == "p"
    again = loaded.transform(df).select("prediction").toPandas()
    assert again["prediction"].tolist() == got["prediction"].tolist()
    # the saved network is also a model path for the inference layer
    by_path = predict(df, f"{path}/estimator", "x", output="class").toPandas()
    assert by_path["prediction"].tolist() == logits.argmax(1).tolist()
    with pytest.raises(ValueError, match=r"holds a saved deepspark.ml.stages.TorchModel"):
        TorchEstimator.load(path)


def test_estimator_save_and_load_keep_params_and_objects(spark, tmp_path):
    torch.manual_seed(0)
    est = TorchEstimator(
        model=MLP(64, 10),
        loss=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        optimizer=torch.optim.SGD,
        optimizerParams={"momentum": 0.9},
        metrics=["accuracy", "top5_accuracy"],
        featureShape=[64],
        batchSize=128,
    )
    est.save(str(tmp_path / "est"))
    loaded = TorchEstimator.load(str(tmp_path / "est"))
    assert loaded.uid == est.uid
    assert loaded.getOptimizer() is torch.optim.SGD
    assert loaded.getOptimizerParams() == {"momentum": 0.9}
    assert loaded.getLoss().label_smoothing == 0.1
    assert loaded.getMetrics() == ["accuracy", "top5_accuracy"]
    assert loaded.getFeatureShape() == [64] and loaded.getBatchSize() == 128
    assert not loaded.isSet(loaded.epochs) and loaded.getEpochs() == 10
    for name, tensor in est.getModel().state_dict().items():
        assert torch.equal(loaded.getModel().state_dict()[name], tensor)
    metadata = json.loads((tmp_path / "est" / "metadata").glob("part-*").__next__().read_text())
    assert metadata["class"] == "deepspark.ml.stages.TorchEstimator"
    assert metadata["paramMap"]["batchSize"] == 128
    assert metadata["paramMap"]["metrics"] == ["accuracy", "top5_accuracy"]  # names are JSON
    assert metadata["deepspark"]["pickledParams"] == ["loss", "model", "optimizer"]


def test_clear_errors_before_any_job(spark):
    train, _ = digits_pixel_frames(spark)
    est = TorchEstimator(model=MLP(64, 10), loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(
        ValueError, match=r"featuresCol='features' is not a column.*VectorAssembler"
    ):
        est.fit(train)
    assembled = VectorAssembler(inputCols=PIXELS, outputCol="features").transform(train)
    with pytest.raises(ValueError, match=r"labelCol='digit' is not a column.*StringIndexer"):
        est.copy({est.labelCol: "digit"}).fit(assembled)
    with pytest.raises(ValueError, match=r"needs model="):
        TorchEstimator(loss=torch.nn.CrossEntropyLoss()).fit(assembled)
    with pytest.raises(ValueError, match=r"needs loss="):
        TorchEstimator(model=MLP(64, 10)).fit(assembled)
    model = TorchModel(module=MLP(64, 10))
    with pytest.raises(ValueError, match=r"featuresCol='features' is not a column"):
        model.transform(train)
    with pytest.raises(ValueError, match=r"predictionCol='label' already exists"):
        model.setPredictionCol("label").transform(assembled)


@pytest.mark.slow
def test_docstring_examples_run(spark):
    failures, tried = doctest.testmod(
        deepspark.ml.stages, extraglobs={"spark": spark}, optionflags=doctest.ELLIPSIS
    )
    assert tried > 10 and failures == 0


@pytest.mark.slow
def test_pipeline_fits_transforms_and_persists_over_spark_connect(connect_spark, tmp_path):
    train, test = digits_pixel_frames(connect_spark)
    torch.manual_seed(0)
    est = TorchEstimator(
        model=MLP(64, 10), loss=torch.nn.CrossEntropyLoss(), epochs=3, learningRate=3e-3
    )
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=PIXELS, outputCol="features"), est])
    fitted = pipeline.fit(train)
    scored = fitted.transform(test)
    assert _accuracy(scored) >= 0.8
    path = str(tmp_path / "connect-pipeline")
    fitted.write().overwrite().save(path)
    fitted.stages[-1].write().overwrite().save(str(tmp_path / "stage"))  # our own overwrite
    loaded = PipelineModel.load(path)
    expected = scored.select("id", "prediction").toPandas().sort_values("id", ignore_index=True)
    again = loaded.transform(test).select("id", "prediction").toPandas()
    assert again.sort_values("id", ignore_index=True).equals(expected)
