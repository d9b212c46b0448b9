"""deepspark quickstart: scikit-learn's digits, prepared with Spark ML, trained on 2 workers.

Run with `make demo`. Everything is written under ./out/quickstart (or $DEEPSPARK_OUT).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import deepspark as ds

OUT = Path(os.environ.get("DEEPSPARK_OUT", "out/quickstart")).resolve()


class DigitsNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def main() -> None:
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    spark = ds.init_context(cores=2, app_name="deepspark-quickstart")

    digits = load_digits(as_frame=True).frame  # 1,797 8x8 images, 64 pixel columns + target
    pixels = [c for c in digits.columns if c.startswith("pixel")]
    df = spark.createDataFrame(digits).withColumnRenamed("target", "label")
    df = VectorAssembler(inputCols=pixels, outputCol="raw").transform(df)
    df = StandardScaler(inputCol="raw", outputCol="features").fit(df).transform(df)
    train_df, test_df = df.select("features", "label").randomSplit([0.8, 0.2], seed=7)

    # each run checkpoints into its own folder: a used one is refused unless fit(resume=True)
    checkpoints = OUT / "checkpoints" / time.strftime("run-%Y%m%d-%H%M%S")
    torch.manual_seed(0)
    est = ds.Estimator.from_torch(
        model=DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=2e-3),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )
    history = est.fit(
        train_df,
        feature_cols=["features"],
        label_cols=["label"],
        epochs=12,
        batch_size=64,
        validation_data=test_df,
        num_workers=2,
        checkpoint_dir=str(checkpoints),
        seed=0,
    )
    print(
        history[["epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_s"]].to_string(
            index=False
        )
    )
    scores = est.evaluate(test_df, feature_cols=["features"], label_cols=["label"])
    print(f"test accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f}")

    predictions = est.predict(test_df, feature_cols=["features"], output="class")
    predictions.select("label", "prediction").write.mode("overwrite").parquet(
        str(OUT / "predictions.parquet")
    )
    est.save(str(OUT / "model"))
    _plot(history, OUT / "training_curve.png")
    ds.stop_context()
    print(f"predictions: {OUT / 'predictions.parquet'}")
    print(f"model:       {OUT / 'model'}")
    print(f"checkpoints: {checkpoints}")
    print(f"curve:       {OUT / 'training_curve.png'}")
    print(f"done in {time.perf_counter() - started:.1f} s")


def _plot(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(history["epoch"], history["train_loss"], label="train")
    loss_axis.plot(history["epoch"], history["val_loss"], label="validation")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    accuracy_axis.plot(history["epoch"], history["val_accuracy"], color="tab:green")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("validation accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
