"""The documentation runs: every ```python block of README.md and docs/*.md, as written.

The blocks of one page are joined in order into one script (a later block may continue an
earlier one) and run in a fresh interpreter, in an empty directory. A block fenced as
```python no-run is illustrative (a cluster that does not exist here) and is skipped, as are
```text and ```bash; any other info string, or none, fails, so a typo cannot silently turn an
example off.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUNNABLE = "python"
NOT_RUN = {"text", "bash", "python no-run"}
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
PAGE_TIMEOUT_S = 900  # a page starts Spark and trains many times, on a busy 2-core machine


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, body) of each fenced block; unclosed fences raise."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, info = opening.group(1), opening.group(2).strip()
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].rstrip() != fence:
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"line {start + 1}: the fence {fence}{info} is never closed")
        blocks.append((start + 1, info, "\n".join(body) + "\n"))
        index += 1
    return blocks


def page_script(page: Path) -> str:
    """The runnable blocks of `page` joined in order; an unknown info string raises."""
    parts = []
    for line, info, body in code_blocks(page.read_text()):
        if info == RUNNABLE:
            parts.append(f"# --- {page.name}, block at line {line}\n{body}")
        elif info not in NOT_RUN:
            known = ", ".join(repr(name) for name in sorted({RUNNABLE, *NOT_RUN}))
            raise ValueError(
                f"{page.name} line {line}: code block info string {info!r} is not known; "
                f"use one of {known}"
            )
    return "\n".join(parts)


def test_code_blocks_reads_fences_and_info_strings():
    text = "a\n```python\nx = 1\n```\n```python no-run\ny\n```\n````\n```\n````\n"
    assert code_blocks(text) == [
        (2, "python", "x = 1\n"),
        (5, "python no-run", "y\n"),
        (8, "", "```\n"),
    ]
    with pytest.raises(ValueError, match="never closed"):
        code_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("info", ["pyhton", "", "py"])
def test_unknown_info_string_is_refused(tmp_path, info):
    page = tmp_path / "page.md"
    page.write_text(f"```{info}\nprint(1)\n```\n")
    with pytest.raises(ValueError, match=f"{info!r} is not known"):
        page_script(page)


def test_page_script_joins_runnable_blocks_in_order(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n```python no-run\nconnect()\n```\n"
        "```bash\nmake demo\n```\n```python\nprint(x)\n```\n"
    )
    script = page_script(page)
    assert "connect()" not in script and "make demo" not in script
    assert script.index("x = 1") < script.index("print(x)")


# Two pages run at a time: a page is mostly one interpreter starting, a JVM starting and the
# latency of small jobs, so on 2 cores a second page fills the time the first leaves idle.
PAGES_AT_ONCE = 2


@dataclass
class PageRun:
    """One page's examples, run as a script in a fresh interpreter and an empty directory."""

    page: Path
    directory: Path
    script: str = ""
    process: subprocess.Popen | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def path(self) -> Path:
        return self.directory / f"{self.page.stem}_examples.py"

    def run(self) -> PageRun:
        self.script = page_script(self.page)
        if not self.script:
            return self
        self.path.write_text(self.script)
        # run them as a user would: init_context chooses the workers' Python on its own
        env = {name: value for name, value in os.environ.items() if name != "PYSPARK_PYTHON"}
        self.process = subprocess.Popen(
            [sys.executable, str(self.path)],
            cwd=self.directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            self.stdout, self.stderr = self.process.communicate(timeout=PAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            self.stdout, self.stderr = self.process.communicate()
            self.stderr += f"\n(killed after {PAGE_TIMEOUT_S} s)"
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory) -> Iterator[dict[str, Future]]:
    """The selected pages' runs, started together, `PAGES_AT_ONCE` at a time.

    Under pytest-xdist the workers are what run pages side by side: each page is a unit of its
    own (the `spread` mark), so a worker's session lists pages another worker runs, and each
    test runs its own page when it comes.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        yield {}
        return
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if item.originalname == "test_page_examples_run" and hasattr(item, "callspec")
    ]
    runs = [PageRun(page, tmp_path_factory.mktemp(page.stem)) for page in selected]
    pool = ThreadPoolExecutor(max_workers=PAGES_AT_ONCE, thread_name_prefix="docs-page")
    futures = {run.page.name: pool.submit(run.run) for run in runs}
    try:
        yield futures
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for run in runs:  # pages left running when the run stops early
            run.stop()


@pytest.mark.slow
@pytest.mark.spread
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_examples_run(page, page_runs, tmp_path):
    started = page_runs.get(page.name)
    run = started.result() if started is not None else PageRun(page, tmp_path).run()
    assert run.script, f"{page.name} has no runnable python block: every guide shows code that runs"
    code = run.process.returncode
    assert code == 0, (
        f"the examples of {page.name} failed (exit {code}); script {run.path}\n"
        f"--- stdout (tail)\n{run.stdout[-3000:]}\n--- stderr (tail)\n{run.stderr[-6000:]}"
    )
