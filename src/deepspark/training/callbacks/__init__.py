"""Training callbacks, with TensorBoard and MLflow integrations.

Built in: :class:`EarlyStopping`, :class:`ModelCheckpoint` and :class:`CSVLogger`,
:class:`TensorBoardCallback` and :class:`MLflowCallback`.

A callback object lives in two places during ``Estimator.fit``:

* **on the driver**, the object the user passed: :meth:`Callback.on_fit_begin` runs before the
  job starts and :meth:`Callback.on_fit_end` after it finished (or failed for good);
* **on every rank**, a pickled copy made when the job is launched (again for each retry): the
  worker hooks ``on_train_begin``, ``on_epoch_begin``, ``on_batch_end``, ``on_epoch_end`` and
  ``on_train_end`` run there with a :class:`CallbackState`. Callbacks with
  ``rank_zero_only = True`` run on rank 0 only.

What a worker copy changes on itself does not come back to the driver; what ``on_fit_begin``
sets on the driver's object is in every worker copy (:class:`MLflowCallback` creates its run
there, so all retries log into one run).

Worker hooks are called with :func:`call_worker_hook` and driver hooks with
:func:`call_driver_hook`. ``state.logs`` holds, at ``on_batch_end``, the batch's ``loss``; at
``on_epoch_end``, the epoch's reduced values (``train_loss``, ``val_loss``, ``val_<metric>``,
...); at ``on_train_end``, the last epoch's.
"""

from deepspark.training.callbacks.files import CSVLogger, ModelCheckpoint
from deepspark.training.callbacks.hooks import (
    DRIVER_HOOKS,
    WORKER_HOOKS,
    Callback,
    CallbackState,
    call_driver_hook,
    call_worker_hook,
)
from deepspark.training.callbacks.integrations import MLflowCallback, TensorBoardCallback
from deepspark.training.callbacks.stopping import EarlyStopping

__all__ = [
    "DRIVER_HOOKS",
    "WORKER_HOOKS",
    "CSVLogger",
    "Callback",
    "CallbackState",
    "EarlyStopping",
    "MLflowCallback",
    "ModelCheckpoint",
    "TensorBoardCallback",
    "call_driver_hook",
    "call_worker_hook",
]
