"""The benchmark log names the code it measured: a change anywhere in the checkout marks a run.

benchmarks/_common.py stamps every line of benchmarks/log.jsonl with the commit and ``+dirty``
when uncommitted changes were measured. These tests copy it into a fresh git repository and
check the stamp after changes under src/, under benchmarks/, and to the log alone.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A repository holding a copy of _common.py, a source file and a log, all committed."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "src").mkdir()
    shutil.copy(COMMON, tmp_path / "benchmarks" / "_common.py")
    (tmp_path / "benchmarks" / "log.jsonl").write_text("")
    (tmp_path / "src" / "model.py").write_text("SIZE = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    spec = importlib.util.spec_from_file_location(
        "copied_common", tmp_path / "benchmarks" / "_common.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield tmp_path, module
    finally:
        sys.modules.pop(spec.name, None)


def test_a_clean_checkout_is_its_commit(checkout):
    root, common = checkout
    assert common._commit() == _git(root, "rev-parse", "--short", "HEAD")


def test_a_change_under_src_marks_the_run_dirty(checkout):
    root, common = checkout
    (root / "src" / "model.py").write_text("SIZE = 2\n")
    assert common._commit() == _git(root, "rev-parse", "--short", "HEAD") + "+dirty"


def test_a_change_to_a_benchmark_marks_the_run_dirty(checkout):
    root, common = checkout
    (root / "benchmarks" / "_common.py").write_text(
        (root / "benchmarks" / "_common.py").read_text() + "\n# edited\n"
    )
    assert common._commit().endswith("+dirty")


def test_the_log_growing_is_not_a_change_to_what_was_measured(checkout):
    root, common = checkout
    (root / "benchmarks" / "log.jsonl").write_text('{"logged_at": "now"}\n')
    assert common._commit() == _git(root, "rev-parse", "--short", "HEAD")
