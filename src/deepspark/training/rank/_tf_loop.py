"""The training loop of one ``MultiWorkerMirroredStrategy`` worker (Keras, TensorFlow backend).

Rank side, inside the process `deepspark.training.rank._tf_worker` starts; no pyspark here.

A custom loop (``strategy.run`` with a ``GradientTape`` and ``optimizer.apply``) rather than
``model.fit``: under ``MultiWorkerMirroredStrategy`` Keras 3.15's ``fit`` fails ("Attempt to
convert PerReplica ... to a Tensor", keras-team/keras#20585) and then in its per-step log
reduction. The model is compiled all the same (inside ``strategy.scope()``), so that the loss,
its per-output structure and the metrics keep their Keras meanings.

Data: the partition's Arrow spill (the one the torch engine reads), as a ``tf.data`` pipeline
from ``strategy.distribute_datasets_from_function``: each worker gives its replica its own
batches of ``plan.local_batch_sizes[rank]`` rows, and every worker takes the plan's
``steps_per_epoch`` steps (the plan comes from every rank's row count, so uneven partitions
never leave a worker waiting in a collective). Filler rows weigh 0. The loss of a step is the
sum over the step's real rows on every worker divided by their number (exact, as on the torch
path); metrics are Keras metrics, whose sums are reduced over the workers at the epoch's end.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np

from deepspark.training.job_spec import TRAIN_SPLIT, VALIDATION_SPLIT, JobKind
from deepspark.training.rank._tf_rank import WorkerJob
from deepspark.training.rank._tf_variables import VariablesState

__all__ = ["TFTrainer"]

PROGRESS_INTERVAL_S = 0.5


def _model_from(blob: bytes, config: dict[str, Any]) -> Any:
    """The model inside the strategy's scope: a ``.keras`` file's bytes, or a creator."""
    from deepspark.persist.keras_files import keras_from_bytes

    kind, payload = cloudpickle.loads(blob)
    if kind == "keras-file":
        return keras_from_bytes(payload, "tensorflow")
    return payload(dict(config))


def _arrays(value: Any) -> Any:
    """A batch's torch tensors (or dicts, lists of them) as numpy arrays, without copies."""
    if isinstance(value, dict):
        return {key: _arrays(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_arrays(item) for item in value)
    return value.numpy()


def _keras_args(values: tuple[Any, ...]) -> Any:
    """Features or labels as Keras takes them: one value, or a tuple for several."""
    converted = _arrays(values)
    return converted[0] if len(converted) == 1 else converted


def _padded(value: Any, rows: int) -> Any:
    """Every array of `value` grown to `rows` rows by repeating its rows (filler, weight 0)."""
    if isinstance(value, dict):
        return {key: _padded(item, rows) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_padded(item, rows) for item in value)
    if len(value) == rows:
        return value
    return np.take(value, np.arange(rows) % len(value), axis=0)


class TFTrainer:
    """One worker's model, optimizer, steps and epochs; `run` does the job's work."""

    def __init__(self, job: WorkerJob, messages: Any) -> None:
        import keras
        import tensorflow as tf

        self.job, self.spec, self.rank = job, job.spec, job.rank
        self.messages = messages
        self.marks: dict[str, float] = {"validation_s": 0.0}
        from deepspark.persist.keras_files import restored_keras_objects

        self.tf, self.keras = tf, keras
        spec = self.spec
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=float(spec.collective_timeout_s)
        )
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self.marks["rendezvous_done"] = time.time()
        if self.strategy.num_replicas_in_sync != spec.world_size:
            raise RuntimeError(
                f"rank {self.rank}: TensorFlow formed {self.strategy.num_replicas_in_sync} "
                f"replicas for {spec.world_size} workers; each Spark task must see one device "
                "(one CPU, or one GPU)"
            )
        keras.utils.set_random_seed(int(spec.seed) + self.rank)
        with self.strategy.scope():
            self.model = _model_from(spec.program.model_blob, spec.program.config)
            loss, loss_weights = restored_keras_objects(
                cloudpickle.loads(spec.program.loss_blob), keras
            )
            metrics = (
                restored_keras_objects(cloudpickle.loads(spec.program.metrics_blob), keras) or None
            )
            self.optimizer = None
            if spec.program.optimizer_blob is not None:
                self.optimizer = keras.optimizers.get(
                    cloudpickle.loads(spec.program.optimizer_blob)
                )
            # as weighted metrics: the weights are 0 for the filler rows that keep the workers
            # in step and 1 for real rows (Keras's plain metrics ignore weights)
            self.model.compile(
                optimizer=self.optimizer,
                loss=loss,
                loss_weights=loss_weights,
                weighted_metrics=metrics,
            )
            if self.optimizer is not None:
                self.optimizer.build(self.model.trainable_variables)
            self.loss_sum = keras.metrics.Sum(name="deepspark_loss_sum")
            self.real_rows = keras.metrics.Sum(name="deepspark_real_rows")
        all_callbacks = cloudpickle.loads(spec.callbacks_blob) if spec.callbacks_blob else []
        self.keras_callbacks = [c for c in all_callbacks if isinstance(c, keras.callbacks.Callback)]
        self.callbacks = [c for c in all_callbacks if not isinstance(c, keras.callbacks.Callback)]
        self.marks["model_ready"] = time.time()

    # --- the job ------------------------------------------------------------------------------

    def run(self) -> None:
        if self.spec.kind is JobKind.EVALUATE:
            scores = self.evaluate(VALIDATION_SPLIT)
            self._write("metrics.json", json.dumps(scores).encode())
            return
        history = self.fit()
        if self.rank == 0:
            from deepspark.persist.weights import weights_to_bytes

            self._write("history.json", json.dumps(history).encode())
            self._write("weights.safetensors", weights_to_bytes(self._weights().state_dict()))

    def _write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.job.output_dir, name), "wb") as handle:
            handle.write(data)

    def _weights(self) -> VariablesState:
        return VariablesState(self.model.weights)

    # --- steps --------------------------------------------------------------------------------

    def _step_functions(self):
        tf, strategy, model, optimizer = self.tf, self.strategy, self.model, self.optimizer
        replicas = strategy.num_replicas_in_sync
        compile_loss, compile_metrics = model._compile_loss, model._compile_metrics

        def local_loss_sum(y, pred, weights):
            # Keras's compiled loss with sample weights is sum(weight * loss) / rows of the
            # batch, divided by the replicas under a tf.distribute strategy: undo both
            rows = tf.cast(tf.shape(weights)[0], "float32")
            return tf.cast(compile_loss(y, pred, weights), "float32") * rows * replicas

        def track(y, pred, weights, loss_sum):
            self.loss_sum.update_state(loss_sum)
            self.real_rows.update_state(tf.reduce_sum(weights))
            if compile_metrics is not None:
                compile_metrics.update_state(y, pred, weights)

        def train_replica(x, y, weights, global_rows):
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss_sum = local_loss_sum(y, pred, weights)
                loss = loss_sum / global_rows
                if model.losses:  # regularisation: once over all replicas
                    loss += tf.add_n(model.losses) / replicas
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            track(y, pred, weights, loss_sum)
            return loss_sum, tf.reduce_sum(weights)

        @tf.function
        def train_step(iterator):
            x, y, weights, global_rows = next(iterator)
            return strategy.run(train_replica, args=(x, y, weights, global_rows))

        def eval_replica(x, y, weights):
            pred = model(x, training=False)
            loss_sum = local_loss_sum(y, pred, weights) if compile_loss is not None else 0.0
            track(y, pred, weights, loss_sum)

        @tf.function(reduce_retracing=True)
        def eval_step(x, y, weights):
            strategy.run(eval_replica, args=(x, y, weights))

        return train_step, eval_step

    def _results(self, prefix: str) -> dict[str, float]:
        """The pass's loss and metrics over every worker's rows (reads reduce across workers),
        and the trackers reset for the next pass."""
        total, rows = float(self.loss_sum.result()), float(self.real_rows.result())
        record = {f"{prefix}loss": total / max(rows, 1.0)}
        metrics = self.model._compile_metrics
        if metrics is not None:
            for name, value in metrics.result().items():
                record[f"{prefix}{name}"] = float(value)
            metrics.reset_state()
        self.loss_sum.reset_state()
        self.real_rows.reset_state()
        record[f"{prefix}rows"] = int(rows)
        return record

    def _sum_over_workers(self, value: float) -> float:
        tf, strategy = self.tf, self.strategy
        per_replica = strategy.run(lambda: tf.constant(value, "float32"))
        return float(strategy.reduce("SUM", per_replica, axis=None))

    # --- data ---------------------------------------------------------------------------------

    def _plan(self):
        from deepspark.data import plan_steps

        return plan_steps(self.job.train_rows, self.spec.batch_size, self.spec.step_policy)

    def _train_batches(self, plan, first_epoch: int) -> Iterator[tuple[Any, Any, Any, Any]]:
        """This worker's training batches, epoch after epoch from `first_epoch`, endlessly
        (the loop takes `plan.steps_per_epoch` per epoch; an endless dataset spares MWMS a
        collective per step that checks whether every worker still has data)."""
        spec, spill = self.spec, self.job.spill
        for epoch in itertools.count(first_epoch):
            batches = spill.epoch(
                spec.features,
                spec.labels,
                plan=plan,
                rank=self.rank,
                epoch=epoch,
                seed=spec.seed,
                shuffle=True,
                split=TRAIN_SPLIT,
            )
            for step, batch in enumerate(batches):
                weights = np.zeros(len(batch), dtype=np.float32)
                weights[: batch.num_real] = 1.0
                global_rows = np.float32(max(plan.global_real_rows(step), 1))
                yield _keras_args(batch.features), _keras_args(batch.labels), weights, global_rows

    def _train_iterator(self, plan, first_epoch: int):
        tf = self.tf
        batches = self._train_batches(plan, first_epoch)
        first = next(batches)

        def spec_of(value):
            return tf.TensorSpec((None, *value.shape[1:]), tf.as_dtype(value.dtype))

        signature = tf.nest.map_structure(spec_of, first)
        signature = (*signature[:3], tf.TensorSpec((), tf.float32))

        def dataset_fn(input_context):
            if input_context.input_pipeline_id != self.rank:
                raise RuntimeError(
                    f"rank {self.rank}: TensorFlow calls it input pipeline "
                    f"{input_context.input_pipeline_id}; TF_CONFIG's task index must be the rank"
                )
            dataset = tf.data.Dataset.from_generator(
                lambda: itertools.chain([first], batches), output_signature=signature
            )
            infinite = tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
            return dataset.apply(infinite).prefetch(2)

        distributed = self.strategy.distribute_datasets_from_function(dataset_fn)
        return iter(distributed)

    def _ordered_batches(self, split: int, batch_size: int) -> Iterator[tuple[Any, Any, Any]]:
        spill = self.job.spill
        if spill.num_rows(split) == 0:
            return
        for batch in spill.ordered(
            self.spec.features, self.spec.labels, batch_size=batch_size, split=split
        ):
            weights = np.zeros(batch_size, dtype=np.float32)
            weights[: batch.num_real] = 1.0
            x = _padded(_keras_args(batch.features), batch_size)
            y = _padded(_keras_args(batch.labels), batch_size)
            yield x, y, weights

    # --- fit and evaluate ---------------------------------------------------------------------

    def evaluate(self, split: int) -> dict[str, float]:
        """Loss and metrics over every worker's rows of `split`; each worker reads its own."""
        started = time.perf_counter()
        if not hasattr(self, "_eval_step"):
            self._train_step, self._eval_step = self._step_functions()
        batch_size = max(1, -(-self.spec.batch_size // self.spec.world_size))
        for x, y, weights in self._ordered_batches(split, batch_size):
            self._eval_step(x, y, weights)
        record = self._results("")
        record.pop("rows")
        if self.model._compile_loss is None:
            record.pop("loss")
        self.marks["validation_s"] += time.perf_counter() - started
        return record

    def _restore(self) -> tuple[int, list[dict[str, Any]]]:
        """The epoch to start at and the history so far, from the latest checkpoint."""
        from deepspark.training.rank.checkpoint import latest_checkpoint, load_checkpoint

        spec = self.spec
        if not (spec.recovery.checkpoint_dir and spec.recovery.resume):
            return 0, []
        info = latest_checkpoint(spec.recovery.checkpoint_dir)
        if info is None:
            return 0, []
        if info.extra.get("backend") != "tensorflow":
            raise ValueError(
                f"the checkpoint {info.path} was not written by a Keras TensorFlow-backend fit; "
                "resume it with the estimator that wrote it, or give a new checkpoint_dir"
            )
        optimizer = VariablesState(self.optimizer.variables)
        load_checkpoint(info, self._weights(), optimizer, restore_rng=False)
        return info.epoch + 1, list(info.extra.get("history", []))

    def _checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        from deepspark.training.rank.checkpoint import save_checkpoint

        save_checkpoint(
            self.spec.recovery.checkpoint_dir,
            epoch,
            self._weights(),
            VariablesState(self.optimizer.variables),
            extra={"history": history, "backend": "tensorflow"},
        )

    def fit(self) -> list[dict[str, Any]]:
        spec, rank = self.spec, self.rank
        from deepspark.training.callbacks import CallbackState, call_worker_hook

        self._train_step, self._eval_step = self._step_functions()
        start, history = self._restore()
        plan = self._plan()
        steps = plan.steps_per_epoch
        params = {
            "epochs": spec.loop.epochs,
            "batch_size": spec.batch_size,
            "num_workers": spec.world_size,
            "steps": steps,
        }
        keras_callbacks = self._keras_callback_list(steps) if rank == 0 else None

        def hook(name: str, epoch: int, step: int, logs: dict[str, Any]) -> CallbackState:
            state = CallbackState(
                epoch=epoch,
                step=step,
                rank=rank,
                world_size=spec.world_size,
                logs=logs,
                model=self.model,
                epochs=spec.loop.epochs,
                params=params,
            )
            call_worker_hook(self.callbacks, name, state)
            return state

        hook("on_train_begin", start, 0, {})
        if keras_callbacks is not None:
            keras_callbacks.on_train_begin()
        iterator = self._train_iterator(plan, start) if start < spec.loop.epochs else None
        for epoch in range(start, spec.loop.epochs):
            hook("on_epoch_begin", epoch, 0, {})
            if keras_callbacks is not None:
                keras_callbacks.on_epoch_begin(epoch)
            record = self._train_epoch(iterator, epoch, steps, hook, keras_callbacks)
            if spec.has_validation:
                scores = self.evaluate(VALIDATION_SPLIT)
                record.update({f"val_{name}": value for name, value in scores.items()})
            history.append(record)
            if rank == 0:
                self.messages.progress({"kind": "epoch", "epoch": epoch, "metrics": record})
            state = hook("on_epoch_end", epoch, steps, record)
            stop = state.stop_training
            if keras_callbacks is not None:
                keras_callbacks.on_epoch_end(epoch, _keras_logs(record))
                stop = stop or bool(getattr(self.model, "stop_training", False))
            # one decision for all workers: none stops alone and leaves the others waiting
            stopped = self._sum_over_workers(float(stop)) > 0
            if (
                rank == 0
                and spec.recovery.checkpoint_dir
                and (
                    (epoch + 1) % spec.recovery.checkpoint_every == 0
                    or epoch + 1 == spec.loop.epochs
                    or stopped
                )
            ):
                self._checkpoint(epoch, history)
            if stopped:
                break
        self.marks["train_done"] = time.time()
        hook("on_train_end", spec.loop.epochs, 0, history[-1] if history else {})
        if keras_callbacks is not None:
            keras_callbacks.on_train_end(_keras_logs(history[-1]) if history else {})
        return history

    def _keras_callback_list(self, steps: int):
        if not self.keras_callbacks:
            return None
        return self.keras.callbacks.CallbackList(
            self.keras_callbacks,
            add_history=False,
            add_progbar=False,
            model=self.model,
            epochs=self.spec.loop.epochs,
            steps=steps,
            verbose=0,
        )

    def _train_epoch(self, iterator, epoch, steps, hook, keras_callbacks) -> dict[str, Any]:
        spec, rank, tf = self.spec, self.rank, self.tf
        started = time.perf_counter()
        last_report = started
        wants_loss = bool(self.callbacks) or keras_callbacks is not None
        for step in range(steps):
            loss_sum, rows = self._train_step(iterator)
            if "first_step" not in self.marks:
                self.marks["first_step"] = time.time()
            now = time.perf_counter()
            report = rank == 0 and now - last_report >= PROGRESS_INTERVAL_S
            if not (wants_loss or report):
                continue
            local = self.strategy.experimental_local_results
            loss_value = float(tf.add_n(local(loss_sum)))
            real = float(tf.add_n(local(rows)))
            logs = {"loss": loss_value / max(real, 1.0)}
            hook("on_batch_end", epoch, step, logs)
            if keras_callbacks is not None:
                keras_callbacks.on_train_batch_end(step, logs)
            if report:
                last_report = now
                self.messages.progress(
                    {
                        "kind": "step",
                        "epoch": epoch,
                        "epochs": spec.loop.epochs,
                        "step": step + 1,
                        "steps": steps,
                        "loss": logs["loss"],
                        "samples_per_s": (step + 1) * spec.batch_size / max(now - started, 1e-9),
                    }
                )
        record: dict[str, Any] = {"epoch": epoch}
        scores = self._results("train_")
        elapsed = time.perf_counter() - started
        record.update(scores)
        record.update(
            {
                "steps": steps,
                "seconds": elapsed,
                "samples_per_s": scores["train_rows"] / max(elapsed, 1e-9),
            }
        )
        return record


def _keras_logs(record: dict[str, Any]) -> dict[str, float]:
    """A history record in Keras's names: ``loss``, ``accuracy``, ``val_loss``, ..."""
    logs = {}
    for name, value in record.items():
        if name.startswith("train_") and name != "train_rows":
            logs[name.removeprefix("train_")] = value
        elif name.startswith("val_"):
            logs[name] = value
    return logs
