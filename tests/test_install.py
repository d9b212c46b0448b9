"""A new user's install: a fresh virtual environment, the guide's own install line, its first
example.

The guide's first ```bash line that runs ``pip install`` is run as written, with ``deepspark``
standing for a copy of this checkout's package files, in a ``python -m venv`` of its own (no
package of the test run's environment is visible there). Then the guide's first ```python
block runs in that environment, in an empty directory. The time series guide is the one
checked here: its extra is light and its first example needs no JVM, so the check is mostly
pip's (with a warm cache, a few minutes on this machine). The vision and AutoML guides were
checked the same way by hand; their commands are on their pages.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import code_blocks

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "timeseries.md"
# What a package of this checkout is built from (pyproject.toml's readme and packages).
PACKAGE_FILES = ("pyproject.toml", "README.md", "src")
INSTALL_TIMEOUT_S = 900  # a cold pip cache downloads pyspark and torch
EXAMPLE_TIMEOUT_S = 300


def torch_pin() -> str:
    """The Makefile's torch pin: on these machines torch 2.13.0 is a CPU wheel on disk, and an
    unpinned torch would download a CUDA build of several GB."""
    found = re.search(r"^TORCH_PIN \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile sets TORCH_PIN"
    return found.group(1)


def install_command(page: Path) -> list[str]:
    """The page's first ``pip install`` line, as the arguments after ``pip``."""
    for _, info, body in code_blocks(page.read_text()):
        if info != "bash":
            continue
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["pip", "install"]:
                return words[1 : words.index("&&")] if "&&" in words else words[1:]
    raise AssertionError(f"{page.name} has no `pip install` line in a ```bash block")


def first_example(page: Path) -> str:
    for _, info, body in code_blocks(page.read_text()):
        if info == "python":
            return body
    raise AssertionError(f"{page.name} has no ```python block")


def test_install_command_is_the_guides_first_pip_line():
    assert install_command(GUIDE) == ["install", "deepspark[timeseries]", "statsmodels"]
    vision = ROOT / "docs" / "vision.md"
    assert install_command(vision) == ["install", "deepspark[vision,examples]"]  # up to "&&"


def _package_copy(target: Path) -> Path:
    """The checkout's package files copied, so pip builds there and not in the checkout."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    target.mkdir()
    for name in PACKAGE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=skip)
        else:
            shutil.copy2(source, target / name)
    return target


def _clean_env() -> dict[str, str]:
    """The environment of a new user's shell: no interpreter or Spark settings of this run."""
    leaked = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"}
    return {name: value for name, value in os.environ.items() if name not in leaked}


def _run(command: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout_s
    )
    assert completed.returncode == 0, (
        f"{shlex.join(command)} exited {completed.returncode}\n--- stdout (tail)\n"
        f"{completed.stdout[-3000:]}\n--- stderr (tail)\n{completed.stderr[-6000:]}"
    )
    return completed


@pytest.mark.slow
def test_fresh_venv_with_the_guides_install_line_runs_its_first_example(tmp_path):
    package = _package_copy(tmp_path / "deepspark-checkout")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    python = str(venv / "bin" / "python")
    arguments = [
        word.replace("deepspark[", f"{package}[", 1) if word.startswith("deepspark[") else word
        for word in install_command(GUIDE)
    ]
    # --no-compile: no .pyc files ahead of time (a third of pip's time here); Python writes
    # those it needs when it imports
    pip = [python, "-m", "pip", "--quiet", *arguments, "--no-compile", torch_pin()]
    _run(pip, tmp_path, INSTALL_TIMEOUT_S)

    work = tmp_path / "work"
    work.mkdir()
    script = work / "first_example.py"
    script.write_text(first_example(GUIDE))
    found = _run([python, "-c", "import deepspark; print(deepspark.__file__)"], work, 60)
    assert found.stdout.startswith(str(venv)), found.stdout  # the installed copy, no other
    _run([python, str(script)], work, EXAMPLE_TIMEOUT_S)
