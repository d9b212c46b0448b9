"""The fit options, declared once: flat keyword arguments sort into their groups, bad values
are refused with the argument's name, and backends refuse what their loop cannot run. No JVM."""

from __future__ import annotations

import dataclasses

import pytest

from deepspark.training import (
    DataOptions,
    EvaluateOptions,
    FitOptions,
    LoopOptions,
    RecoveryOptions,
    RunOptions,
    TensorflowBackend,
)


def test_flat_keywords_land_in_their_groups():
    options = FitOptions.from_keywords(
        feature_cols="x",
        label_cols="y",
        batch_size=64,
        epochs=3,
        precision="bf16",
        checkpoint_dir="/tmp/ckpt",
        max_failures=2,
        num_workers=4,
        callbacks=[],
    )
    assert options.data == DataOptions(feature_cols="x", label_cols="y", batch_size=64)
    assert options.loop == LoopOptions(epochs=3, precision="bf16")
    assert options.recovery == RecoveryOptions(checkpoint_dir="/tmp/ckpt", max_failures=2)
    assert options.run == RunOptions(num_workers=4)
    # every flat name is one group's field, and they read back as given
    assert options.keywords()["max_failures"] == 2
    assert set(options.keywords()) == {
        field.name
        for group in (DataOptions, LoopOptions, RecoveryOptions, RunOptions)
        for field in dataclasses.fields(group)
    }


def test_keywords_change_a_given_options_object_and_none_columns_keep_it():
    base = FitOptions(data=DataOptions(feature_cols="x", label_cols="y"), callbacks=("cb",))
    changed = FitOptions.from_keywords(base, feature_cols=None, callbacks=None, epochs=5)
    assert changed.data.feature_cols == "x"
    assert changed.callbacks == ("cb",)
    assert changed.loop.epochs == 5
    assert base.loop.epochs == 1  # frozen: the base is not changed


def test_an_unknown_keyword_names_the_known_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'epoch'.*epochs"):
        FitOptions.from_keywords(epoch=3)
    with pytest.raises(TypeError, match=r"evaluate\(\) got an unexpected keyword .*'epochs'"):
        EvaluateOptions.from_keywords(epochs=3)


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"epochs": 0}, r"epochs=0: give a positive integer"),
        ({"batch_size": 2.5}, r"batch_size=2.5: give a positive integer"),
        ({"step_policy": "spread"}, r"step_policy='spread': use one of pad, drop, wrap"),
        ({"precision": "fp8"}, r"precision='fp8': use one of fp32, bf16, fp16"),
        ({"max_failures": -1}, r"max_failures=-1: give 0 or more"),
        ({"num_workers": 0}, r"num_workers=0: give a positive integer"),
        ({"collective_timeout_s": 0}, r"collective_timeout_s=0: give a positive number"),
        ({"clip_grad_norm": -1.0}, r"clip_grad_norm=-1.0: give a positive number"),
    ],
)
def test_bad_values_are_refused_naming_the_argument(keywords, message):
    with pytest.raises(ValueError, match=message):
        FitOptions.from_keywords(**keywords).check()


def test_options_that_need_the_job_are_checked_against_it():
    loop = LoopOptions(validate_every_steps=10)
    with pytest.raises(ValueError, match=r"validate_every_steps needs validation_data="):
        loop.check_with(has_validation=False, has_checkpoints=False, use_gpu=False)
    with pytest.raises(ValueError, match=r'precision="fp16" needs use_gpu=True'):
        LoopOptions(precision="fp16").check_with(
            has_validation=False, has_checkpoints=False, use_gpu=False
        )


def test_the_tensorflow_backend_refuses_the_torch_loops_options():
    backend = TensorflowBackend(keras_model=None, optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"accumulate_steps=4 is not supported on Keras's"):
        backend.prepare(FitOptions.from_keywords(accumulate_steps=4))
    prepared = backend.prepare(FitOptions.from_keywords(epochs=2))
    assert prepared.data.step_policy == "pad"
    with pytest.raises(ValueError, match=r"fit needs a loss and an optimizer"):
        TensorflowBackend(keras_model=None, loss=None).prepare(FitOptions())
