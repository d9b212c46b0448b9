"""The live channel from training ranks to the driver (DESIGN decision 7): what it carries.

The driver runs a :class:`~deepspark.training.driver.progress_server.ProgressServer` for one
job and ships its ``address`` and ``token`` to the workers in the job's spec; each rank opens a
:class:`~deepspark.training.rank.progress_client.ProgressClient` and sends small JSON events.
The server keeps the history and hands each event to a sink, such as the
:class:`~deepspark.training.driver.progress_bar.ProgressBar`. Both are the project's one
authenticated channel (`deepspark.context.channel`: nonce, HMAC-framed JSON, growing sequence
numbers, bounded connections), which AutoML's trial reports use too.

Events are dicts with a ``kind``; the client adds ``rank``, ``seq`` and ``time``. The kinds the
driver understands:

=========  ================================================================================
``step``   ``epoch``, ``epochs``, ``step``, ``steps``, ``loss``, ``samples_per_s``
``epoch``  ``epoch``, ``metrics`` (dict of the epoch's reduced values)
``log``    ``text``
``error``  ``error`` (one line), ``traceback`` (its tail)
``hello``  ``attempt``, ``world_size``, ``payload``: the rank's part of the rendezvous
=========  ================================================================================

The rendezvous is the one request: each rank sends a ``hello`` and waits; once the server
holds ``world_size`` hellos of the same ``attempt``, it answers each of those connections with
``{"attempt": ..., "peers": [payload of rank 0, rank 1, ...]}``. Hellos are not kept in the
history. Spark's own ``BarrierTaskContext.allGather`` would do the same job, but each call
costs about one second (``benchmarks/barrier.py``): the driver's channel, which every rank
dials anyway, answers in milliseconds.

Neither side imports pyspark or torch.
"""

from __future__ import annotations

__all__ = ["EVENT_KINDS"]

EVENT_KINDS = ("step", "epoch", "log", "error", "hello")
