"""Two commits of deepspark measured in one run: is the newer one slower anywhere?

Issue #28 asks that the engine refactor leave nothing slower: the fixed cost of a fit, an
epoch of the rank loop against bare DDP, and predict. This script checks out both commits
(``git worktree``, detached, in a temporary folder) and runs the same benchmark scripts, this
checkout's, against each commit's ``src`` (``PYTHONPATH``), in interleaved rounds: round 1 runs
before then after, round 2 after then before, and so on, each script in its own process as a
user's program would be. Each side's figure is the median over the rounds; the ratio is
after / before (below 1: the newer commit is faster).

Every child run's JSON result is kept, whole, in this run's own log line (the children write
their lines into the temporary checkouts' logs, which are removed).

Usage: python benchmarks/commits.py --before 5e44f8c [--after HEAD] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _common import emit_json, machine, print_table, run_logged, today

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# script -> (its arguments, {figure name: how to read it from the script's JSON}); every
# figure is seconds or a ratio of seconds, so lower is better.
FIGURES: dict[str, tuple[list[str], dict[str, Callable[[dict], float]]]] = {
    "fixed_cost": (
        ["--quick", "--fixed-cost-only", "--warm-fits", "8"],
        {
            "fixed_cost_fresh_s": lambda result: result["fresh_fixed_cost_s"],
            "fixed_cost_warm_s": lambda result: result["warm_fixed_cost_s"],
        },
    ),
    "rank_vs_ddp": (
        ["--quick"],
        {
            "rank_epoch_s": lambda result: result["deepspark_rank_epoch_s"],
            "rank_epoch_vs_bare_ddp": lambda result: result["ratio_deepspark_vs_bare_ddp"],
        },
    ),
    "predict": (
        ["--quick", "--cases", "mlp4"],
        {
            "predict_mlp4_s": lambda result: result["mlp4"][result["mlp4"]["deepspark_path"]][
                "median_s"
            ],
        },
    ),
}


def checkout(commit: str, folder: Path) -> str:
    """A detached worktree of ``commit`` in ``folder``; returns the full commit id."""
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", commit], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), full],
        check=True,
        capture_output=True,
    )
    return full


def child_environment(src: Path) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(src)}
    found = subprocess.run(
        [sys.executable, "-c", "import deepspark; print(deepspark.__file__)"],
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not found.startswith(str(src)):  # an installed deepspark shadows the checkout
        raise RuntimeError(f"PYTHONPATH={src} imports deepspark from {found}; use a venv")
    return environment


def run_script(scripts: Path, name: str, arguments: list[str], environment: dict) -> dict:
    """Run one benchmark script; its last stdout line is its JSON result."""
    completed = subprocess.run(
        [sys.executable, str(scripts / f"{name}.py"), *arguments],
        cwd=scripts,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{name}.py failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the older commit")
    parser.add_argument("--after", default="HEAD", help="the newer commit (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scripts", default=",".join(FIGURES), help="comma-separated")
    args = parser.parse_args()
    chosen = args.scripts.split(",")
    unknown = sorted(set(chosen) - set(FIGURES))
    if unknown:
        raise SystemExit(f"--scripts: unknown {unknown}; choose from {sorted(FIGURES)}")
    load_before = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="bench-commits-"))
    sides = {"before": args.before, "after": args.after}
    commits, environments = {}, {}
    scripts = scratch / "benchmarks"
    shutil.copytree(HERE, scripts, ignore=shutil.ignore_patterns("log.jsonl", "__pycache__"))
    try:
        for side, commit in sides.items():
            commits[side] = checkout(commit, scratch / side)
            environments[side] = child_environment(scratch / side / "src")
        runs: dict[str, dict[str, list[dict]]] = {name: {s: [] for s in sides} for name in chosen}
        for number in range(args.rounds):
            order = list(sides) if number % 2 == 0 else list(reversed(sides))
            for name in chosen:
                for side in order:
                    result = run_script(scripts, name, FIGURES[name][0], environments[side])
                    runs[name][side].append(result)
                    print(f"round {number + 1} {name} {side} done", flush=True)
    finally:
        for side in sides:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch / side)],
                capture_output=True,
            )
        shutil.rmtree(scratch, ignore_errors=True)

    figures: dict = {}
    table = []
    for name in chosen:
        for figure, read in FIGURES[name][1].items():
            values = {side: [read(result) for result in runs[name][side]] for side in sides}
            medians = {side: statistics.median(values[side]) for side in sides}
            ratio = medians["after"] / medians["before"]
            figures[figure] = {
                **{f"{side}_values": values[side] for side in sides},
                **{f"{side}_median": round(medians[side], 4) for side in sides},
                "ratio_after_vs_before": round(ratio, 3),
            }
            table.append([figure, medians["before"], medians["after"], ratio])
    print_table(["figure", "before", "after", "after / before"], table)
    load_after = os.getloadavg()[0]
    emit_json(
        {
            "benchmark": "commits",
            "date": today(),
            "machine": machine(),
            "before": commits["before"],
            "after": commits["after"],
            "rounds": args.rounds,
            "figures": figures,
            "children": runs,
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(load_after, 2),
            "contended": max(load_before, load_after) > (os.cpu_count() or 1),
        }
    )


if __name__ == "__main__":
    run_logged("commits", main)
