"""The rank code without Spark: real processes, a real process group, a real fit.

The ranks run in spawned processes driven by ``tests/rank_harness.py`` (which imports neither
pyspark nor scikit-learn, so it also runs on GPU machines). Here they use gloo on the CPU; with
``DEEPSPARK_TEST_DEVICE=cuda`` on a machine with CUDA they use NCCL on the GPU (one rank per
visible GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rank_harness
from deepspark.training.rank.run import cuda_device_index

DEVICE = os.environ.get("DEEPSPARK_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    # asked for explicitly: a missing device is an error, not a reason to pass quietly
    raise RuntimeError("DEEPSPARK_TEST_DEVICE=cuda, but torch sees no CUDA device")
RANKS = [1, 2] if DEVICE == "cpu" else [n for n in (1, 2) if n <= torch.cuda.device_count()]


@pytest.mark.parametrize("world_size", RANKS)
def test_ranks_fit_and_rank_0_sends_back_weights_that_learnt(world_size):
    report = rank_harness.run_harness(DEVICE, world_size, epochs=4)
    assert report["ok"], "\n".join(report["failures"])
    assert report["train_rows"] == rank_harness.TRAIN_ROWS
    assert report["returned_weights_val_accuracy"] >= 0.9
    assert report["resumed_epochs"] == [0, 1, 2, 3, 4]


def test_spark_gpu_addresses_map_to_torch_indices_through_cuda_visible_devices():
    assert cuda_device_index("0", None, 1) == 0
    assert cuda_device_index("5", None, 8) == 5
    # Spark assigns physical ids; torch counts only the visible devices, in their order.
    assert cuda_device_index("5", "4,5,6", 3) == 1
    assert cuda_device_index("6", "6,4", 2) == 0
    assert cuda_device_index(" 4 ", "4, 5", 2) == 0
    uuid = "GPU-8d1c2a8e-1f0b-4b8e-9c1d-2f6a7b3c4d5e"
    assert cuda_device_index(uuid, f"GPU-0000,{uuid}", 2) == 1
    with pytest.raises(ValueError, match=r"assigned GPU '2'.*CUDA_VISIBLE_DEVICES='4,5'"):
        cuda_device_index("2", "4,5", 2)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=''"):
        cuda_device_index("0", "", 0)
    with pytest.raises(ValueError, match=r"torch index 3.*sees 2 CUDA device"):
        cuda_device_index("3", None, 2)
    with pytest.raises(ValueError, match="not a device index"):
        cuda_device_index(uuid, None, 1)


def test_rank_code_and_harness_import_without_pyspark_or_sklearn():
    code = (
        "import sys\n"
        "sys.modules['pyspark'] = None\n"  # any import of pyspark now fails
        "sys.modules['sklearn'] = None\n"
        "import rank_harness\n"
        "import deepspark.training.rank.run, deepspark.training.rank.loop\n"
        "import deepspark.training.rank.checkpoint, deepspark.training.rank.progress_client\n"
        "rank_harness.make_specs('cpu', 1, 1, '/tmp', type('P', (), {'address': ('h', 1),"
        " 'token': 't'})())\n"
        "rank_harness.rank_batches(0, 2)\n"
    )
    tests_dir = Path(__file__).parent
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
