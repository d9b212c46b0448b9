"""The data package's promises about itself: worker modules without pyspark, docs that run."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest

WORKER_MODULES = [
    "deepspark.data.spec",
    "deepspark.data.readers",
    "deepspark.data.columns",
    "deepspark.data.plan",
    "deepspark.data.batching",
    "deepspark.data.spill_files",
    "deepspark.data.spill",
    "deepspark.data.dataset",
]


def test_worker_modules_do_not_import_pyspark():
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in WORKER_MODULES)
        + "import deepspark.data\n"
        + "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'pyspark')\n"
        + "assert not loaded, loaded\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]


@pytest.mark.parametrize("name", WORKER_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
    if name not in ("deepspark.data.spill_files",):  # no public examples
        assert attempted > 0
