"""Memory stays bounded: a partition several times larger than the budget streams through.

Runs in a fresh process, so its peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs``) measures the feed alone, not the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PARTITION_MB = 384
BUDGET_MB = 128  # the 32 MiB window, a block, a few batches, allocator slack

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, pyarrow as pa, torch
    from deepspark.data import PartitionSpill, TensorSpec, iter_batches, plan_steps

    partition_mb, directory = int(sys.argv[1]), sys.argv[2]
    features = 96
    row_bytes = features * 4 + 8
    rows = partition_mb * 2**20 // row_bytes
    batch_rows = 4096

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    noise = np.random.default_rng(0).standard_normal(batch_rows * features, dtype=np.float32)

    def input_batches():
        # Generated on the fly, like a task's input streaming in from the JVM.
        for start in range(0, rows, batch_rows):
            count = min(batch_rows, rows - start)
            values = noise[: count * features] + np.float32(start)
            offsets = np.arange(0, values.size + 1, features, dtype=np.int32)
            yield pa.record_batch({
                "x": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                "y": pa.array(np.arange(start, start + count)),
            })

    x = TensorSpec("x", "array", (features,))
    y = TensorSpec("y", "scalar", dtype="int64")
    next(iter_batches(input_batches(), x, y, batch_size=8))  # warm up lazy imports
    reset_peak()
    baseline = peak_mb()
    result = {"rows": rows}
    checksum = 0
    with PartitionSpill.write(input_batches(), directory) as spill:
        result["write_mb"] = peak_mb() - baseline
        files = [os.path.join(spill.directory, name) for name in os.listdir(spill.directory)]
        result["spill_mb"] = sum(os.path.getsize(path) for path in files) / 2**20
        plan = plan_steps([spill.num_rows()], 256)
        reset_peak()
        seen = 0
        for batch in spill.epoch(x, y, plan=plan, rank=0, epoch=0, seed=0,
                                 shuffle_window_bytes=32 << 20):
            seen += batch.num_real
            checksum += int(batch.labels[0][: batch.num_real].sum())
        result["epoch_mb"] = peak_mb() - baseline
        result["epoch_rows"] = seen
        reset_peak()
        ordered = sum(len(b) for b in spill.ordered(x, y, batch_size=256, window_bytes=32 << 20))
        result["ordered_mb"] = peak_mb() - baseline
        result["ordered_rows"] = ordered
    reset_peak()
    streamed = sum(len(b) for b in iter_batches(input_batches(), x, y, batch_size=256))
    result["iter_mb"] = peak_mb() - baseline
    result["iter_rows"] = streamed
    result["checksum_ok"] = checksum == rows * (rows - 1) // 2
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_partition_larger_than_the_budget_streams_in_bounded_memory(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(PARTITION_MB), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert result["epoch_rows"] == result["ordered_rows"] == result["iter_rows"] == rows
    assert result["checksum_ok"]  # every row exactly once, even at this size
    assert result["spill_mb"] >= 3 * BUDGET_MB, result  # the premise: far over the budget
    for phase in ("write_mb", "epoch_mb", "ordered_mb", "iter_mb"):
        assert result[phase] < BUDGET_MB, (phase, result)
    assert list(tmp_path.iterdir()) == []
