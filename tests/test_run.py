"""ds.run: a user's own function or script on 2 ranks through real Spark; ds.shard, checkpoints."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import cloudpickle
import pytest
import torch

import deepspark as ds

# Spark's Python workers cannot import the tests folder: the functions here travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _all_reduce_rank_sum(scale: float) -> dict:
    import torch.distributed as dist

    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    print(f"rank says hello, world of {dist.get_world_size()}")
    return {
        "sum": total.item() * scale,
        "backend": dist.get_backend(),
        "env": {name: os.environ.get(name) for name in names},
    }


def test_run_returns_rank_zero_value_with_torchrun_environment(spark, capsys):
    result = ds.run(_all_reduce_rank_sum, 10.0, num_workers=2)
    assert result["sum"] == 30.0  # ranks 1 and 2 summed across the process group
    assert result["backend"] == "gloo"
    env = result["env"]
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "2")
    assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "2")
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    printed = capsys.readouterr().out
    for rank in (0, 1):
        assert f"[rank {rank}] rank says hello, world of 2" in printed


def _fails_on_rank_one() -> None:
    import torch.distributed as dist

    print("about to fail")
    if dist.get_rank() == 1:
        raise ValueError("rank one cannot go on")
    dist.barrier()


def test_failing_rank_reaches_driver_with_rank_and_traceback(spark):
    with pytest.raises(ds.training.RunError) as caught:
        ds.run(_fails_on_rank_one, num_workers=2)
    error = caught.value
    assert error.rank == 1
    assert "rank 1: ValueError: rank one cannot go on" in str(error)
    assert "_fails_on_rank_one" in error.remote_traceback
    assert "about to fail" in error.output
    assert len(error.causes) == 1  # max_failures=0: no re-run


def _epoch_rows(train, validation=None) -> list[dict]:
    import torch.distributed as dist

    batches = ds.shard(train, feature_cols=["x"], label_cols="label", batch_size=8)
    checks = []
    if validation is not None:
        checks = ds.shard(validation, ["x"], "label", batch_size=8, shuffle=False)
    seen = []
    for epoch in range(2):
        ids, sizes = [], []
        for features, labels in batches:
            ids += features.long().tolist()
            sizes.append(len(labels))
            assert labels.dtype == torch.int64
        validated = [int(value) for features, _ in checks for value in features]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (ids, len(sizes), validated))
        seen.append(
            {
                "epoch": epoch,
                "steps": [steps for _, steps, _ in gathered],
                "ids": [rank_ids for rank_ids, _, _ in gathered],
                "validated": sorted(i for _, _, rank_val in gathered for i in rank_val),
            }
        )
    return seen


@pytest.mark.slow
def test_shard_uneven_partitions_every_row_once_per_epoch_same_steps(spark):
    # two partitions of 50 and 15 rows: kept as they are, one per rank
    train = spark.range(0, 100, 1, 2).where("id < 50 or id >= 85")
    train = train.selectExpr("cast(id as double) as x", "id % 3 as label")
    expected = sorted([*range(50), *range(85, 100)])
    orders = []
    for record in ds.run(_epoch_rows, train, num_workers=2):
        assert record["steps"] == [13, 13]  # ceil(50 / 4) on both ranks: nobody waits
        assert sorted(record["ids"][1]) == list(range(85, 100))  # the short partition
        assert sorted(record["ids"][0] + record["ids"][1]) == expected
        orders.append(record["ids"][0])
    assert orders[0] != orders[1]  # reshuffled per epoch

    # with validation rows the two DataFrames travel together, rebalanced over the ranks
    validation = spark.range(200, 230, 1, 3).selectExpr("cast(id as double) as x", "0 as label")
    for record in ds.run(_epoch_rows, train, validation, num_workers=2):
        assert record["steps"][0] == record["steps"][1]
        assert sorted(record["ids"][0] + record["ids"][1]) == expected
        assert record["validated"] == list(range(200, 230))


def test_run_refuses_bad_input_on_the_driver(spark, tmp_path):
    with pytest.raises(ValueError, match="num_workers=99"):
        ds.run(_all_reduce_rank_sum, 1.0, num_workers=99)
    with pytest.raises(TypeError, match="command line, all strings"):
        ds.run(str(_script(tmp_path, "print(1)")), "--lr", 0.01, num_workers=2)
    with pytest.raises(FileNotFoundError, match="no such script"):
        ds.run(str(tmp_path / "missing.py"), num_workers=2)
    lock = __import__("threading").Lock()
    with pytest.raises(TypeError, match="args\\[0\\] cannot be pickled"):
        ds.run(_all_reduce_rank_sum, lock, num_workers=2)
    with pytest.raises(RuntimeError, match="inside a function that deepspark.run runs"):
        ds.shard(None, feature_cols="x", batch_size=2)


def _script(folder, body: str):
    path = folder / "train.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.slow
def test_script_mode_runs_file_with_arguments_on_two_ranks(spark, tmp_path, capsys):
    script = _script(
        tmp_path,
        """
        import os, sys
        import torch, torch.distributed as dist

        dist.init_process_group("gloo")  # env:// from MASTER_ADDR, MASTER_PORT, RANK, ...
        total = torch.tensor([float(sys.argv[2])])
        dist.all_reduce(total)
        print(f"lr {sys.argv[2]} sum {total.item()} local {os.environ['LOCAL_RANK']}")
        dist.destroy_process_group()
        """,
    )
    assert ds.run(str(script), "--lr", "0.25", num_workers=2) is None
    printed = capsys.readouterr().out
    assert "[rank 0] lr 0.25 sum 0.5 local 0" in printed
    assert "[rank 1] lr 0.25 sum 0.5 local 1" in printed


def _trains_with_checkpoints(df, log_path: str, marker: str) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state = ds.restore()
    start = 0
    if state is not None:
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    batches = ds.shard(df, feature_cols=[["x"]], label_cols="y", batch_size=16)
    for epoch in range(start, 4):
        batches.set_epoch(epoch)
        if epoch == 2 and dist.get_rank() == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the rank's process dies mid-run, as on a lost executor
        for features, labels in batches:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(features).squeeze(1), labels)
            loss.backward()
            optimizer.step()
        if dist.get_rank() == 0:
            with open(log_path, "a") as log:
                log.write(json.dumps({"epoch": epoch, "pid": os.getpid()}) + "\n")
        state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
        ds.checkpoint({**state, "epoch": epoch})
    return {"start": start}


@pytest.mark.slow
def test_killed_rank_resumes_from_checkpoint_every_epoch_trained_once(spark, tmp_path):
    df = spark.range(0, 64, 1, 2).selectExpr("id / 64D as x", "id / 32D as y")
    log_path, marker = str(tmp_path / "epochs.jsonl"), str(tmp_path / "killed")
    checkpoints = str(tmp_path / "ckpt")
    result = ds.run(
        _trains_with_checkpoints,
        df,
        log_path,
        marker,
        num_workers=2,
        max_failures=1,
        checkpoint_dir=checkpoints,
    )
    assert os.path.exists(marker)  # the first attempt lost a rank
    assert result == {"start": 2}  # the re-run began after the last finished epoch
    with open(log_path) as log:
        epochs = [json.loads(line)["epoch"] for line in log]
    assert epochs == [0, 1, 2, 3]  # every epoch trained once
    with pytest.raises(ValueError, match="already holds checkpoints"):
        ds.run(_trains_with_checkpoints, df, log_path, marker, checkpoint_dir=checkpoints)


def _regression_frames(spark):
    rows = spark.range(0, 256, 1, 2).selectExpr("id / 256D as x", "3 * id / 256D as y")
    return rows, spark.range(0, 64, 1, 2).selectExpr("id / 64D as x", "3 * id / 64D as y")


def _lightning_fit(train, validation) -> dict:
    import lightning.pytorch as lightning
    import torch.distributed as dist
    import torch.nn.functional as F

    class Regressor(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.rows = 0

        def training_step(self, batch, _):
            features, labels = batch
            self.rows += len(labels)
            return F.mse_loss(self.layer(features).squeeze(1), labels)

        def validation_step(self, batch, _):
            features, labels = batch
            loss = F.mse_loss(self.layer(features).squeeze(1), labels)
            self.log("val_loss", loss, sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    model = Regressor()
    data = ds.training.ShardDataModule(
        train, validation, feature_cols=[["x"]], label_cols="y", batch_size=16
    )
    trainer = lightning.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=data)
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, model.rows)
    return {
        "world": trainer.world_size,
        "rows": rows,
        "before": before,
        "after": float(trainer.callback_metrics["val_loss"]),
    }


@pytest.mark.slow
def test_lightning_trainer_ddp_inside_run_fed_by_shard(spark):
    pytest.importorskip("lightning")
    train, validation = _regression_frames(spark)
    result = ds.run(_lightning_fit, train, validation, num_workers=2)
    assert result["world"] == 2
    assert sum(result["rows"]) == 3 * 256  # every row once per epoch, over both ranks
    assert result["rows"][0] == result["rows"][1]
    assert result["after"] < 0.2 * result["before"]  # it learnt y = 3x


def _hf_train(train, output_dir: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    # The dev extra also installs TensorFlow with Keras 3, whose TF side transformers refuses.
    # Users set USE_TF=0 in the executors' environment (spark.executorEnv.USE_TF); this
    # session's workers started without it and had imported transformers already (torchmetrics
    # looks for it), so its flag is turned off here, before the Trainer is imported.
    import transformers.utils.import_utils as transformers_imports

    transformers_imports._tf_available = False
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    config = BertConfig(
        vocab_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)  # built from its config: nothing downloaded
    batches = ds.shard(
        train,
        feature_cols={"input_ids": "tokens"},
        label_cols={"labels": "label"},
        batch_size=16,
        step_policy="wrap",
    )
    arguments = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_train_epochs=4,
        learning_rate=5e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=batches.rows())
    outcome = trainer.train()
    return {
        "world": arguments.world_size,
        "steps": outcome.global_step,
        "steps_per_epoch": len(batches),
        "loss": outcome.training_loss,
        "epochs_read": batches.epoch,
    }


@pytest.mark.slow
def test_hugging_face_trainer_inside_run_fed_by_shard(spark, tmp_path):
    pytest.importorskip("transformers")
    # the label is whether the first token is odd: a tiny BERT learns it in a few epochs
    train = spark.range(0, 256, 1, 2).selectExpr(
        "array(cast(id % 16 as int), 3, 5, 7) as tokens", "cast(id % 2 as long) as label"
    )
    result = ds.run(_hf_train, train, str(tmp_path / "hf"), num_workers=2)
    assert result["world"] == 2
    assert result["steps_per_epoch"] == 16  # 128 rows per rank, 8 per device per step
    assert result["steps"] == 4 * 16  # every rank took every step: accelerate dealt none away
    assert result["epochs_read"] == 4
    assert result["loss"] < 0.69  # below chance (ln 2)
