"""The package's layering (DESIGN.md, "Layout"): imports point down, rank code has no pyspark,
and the docstring examples of the engine's Spark-free modules run."""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deepspark

PACKAGE = Path(deepspark.__file__).parent
IMPORT = re.compile(r"^\s*(?:from|import)\s+(deepspark(?:\.\w+)*)", re.M)

# Spark-free modules of the engine: they run inside tasks, and on machines without Java.
RANK_SIDE = [
    "deepspark.context.topology",
    "deepspark.context.channel",
    "deepspark.context.channel_server",
    "deepspark.context.channel_client",
    "deepspark.persist.weights",
    "deepspark.persist.estimator_dir",
    "deepspark.persist.optimizer_state",
    "deepspark.persist.programs",
    "deepspark.training.job_spec",
    "deepspark.training.progress",
    "deepspark.training.options",
    "deepspark.training.model_families",
    "deepspark.training.output_losses",
    "deepspark.training.callbacks",
    "deepspark.training.callbacks.hooks",
    "deepspark.training.callbacks.monitoring",
    "deepspark.training.callbacks.stopping",
    "deepspark.training.callbacks.files",
    "deepspark.training.callbacks.integrations",
    "deepspark.training.rank.step",
    "deepspark.training.rank.structure",
    "deepspark.training.rank.metric_routing",
    "deepspark.training.rank.sources",
    "deepspark.training.rank.run",
    "deepspark.training.rank.loop",
    "deepspark.training.rank.rendezvous",
    "deepspark.training.rank.checkpoint",
    "deepspark.training.rank.rng_state",
    "deepspark.training.rank.metrics",
    "deepspark.training.rank.metric_tasks",
    "deepspark.training.rank.progress_client",
    "deepspark.training.rank.first_epoch",
    "deepspark.data.stream",
    "deepspark.data.chunks",
    "deepspark.data.finite",
    "deepspark.training.driver.progress_server",
    "deepspark.training.driver.progress_bar",
    "deepspark.training.driver.timeline",
    "deepspark.inference.keras_runtime",
    "deepspark.persist.keras_files",
    "deepspark.training.rank._tf_rank",
    "deepspark.training.rank._tf_worker",
    "deepspark.training.rank._tf_loop",
    "deepspark.training.rank._tf_variables",
    "deepspark.training.run_spec",
    "deepspark.training.rank._function_rank",
    "deepspark.training.rank._output_relay",
    "deepspark.training.rank.function_state",
    "deepspark.training.rank.shard",
    "deepspark.inference.quantize",
    "deepspark.inference.versions",
    "deepspark.keras.torch_backend",
    "deepspark.keras.keras_callbacks",
    "deepspark.automl.reports",
    "deepspark.vision.decoding",
    "deepspark.vision.zoo",
    "deepspark.vision.darknet",
    "deepspark.vision.image_tasks",
    "deepspark.vision.samples",
    "deepspark.timeseries.series_ops",
    "deepspark.timeseries.windows",
    "deepspark.timeseries.scaler",
    "deepspark.timeseries.forecast_model",
    "deepspark.timeseries.forecast_metrics",
    "deepspark.timeseries.forecaster_io",
    "deepspark.errors",
    "deepspark.deprecation",
]


def _imports(module_path: Path) -> set[str]:
    """The deepspark modules a source file imports, anywhere in it (not in docstring examples)."""
    return set(IMPORT.findall(module_path.read_text()))


def _sources(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


# Capabilities (what users come for) sit above the engines; each stands on its own, except
# time series, whose AutoTS searches on the AutoML engine.
CAPABILITIES = ("deepspark.automl", "deepspark.ray", "deepspark.timeseries", "deepspark.vision")


def _others(*allowed: str) -> tuple[str, ...]:
    return tuple(name for name in (*CAPABILITIES, "deepspark.ml") if name not in allowed)


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("data", ("deepspark.training", "deepspark.inference", "deepspark.ml", *CAPABILITIES)),
        ("persist", ("deepspark.training", "deepspark.inference", "deepspark.ml", *CAPABILITIES)),
        ("context", ("deepspark.training", "deepspark.inference", "deepspark.ml", *CAPABILITIES)),
        ("inference", ("deepspark.training", "deepspark.ml", "deepspark.keras", *CAPABILITIES)),
        (
            "training/rank",
            ("deepspark.training.driver", "deepspark.ml", "deepspark.keras", *CAPABILITIES),
        ),
        ("training", ("deepspark.ml", "deepspark.keras", *CAPABILITIES)),
        ("automl", _others("deepspark.automl")),
        ("ray", _others("deepspark.ray")),
        ("vision", _others("deepspark.vision")),
        ("timeseries", _others("deepspark.timeseries", "deepspark.automl")),
    ],
)
def test_imports_point_down(folder, forbidden):
    wrong = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in _sources(folder)
        for name in _imports(path)
        if name.startswith(forbidden)
    }
    assert not wrong, sorted(wrong)


def test_training_reaches_inference_only_through_the_estimator():
    # est.predict / est.export_* / Estimator.load hand the model to the inference engine (or
    # take its model kinds); nothing else does. The export and load methods are the
    # estimator's, kept in model_io.py (a mixin of Estimator).
    users = {
        str(path.relative_to(PACKAGE))
        for path in _sources("training")
        if any(name.startswith("deepspark.inference") for name in _imports(path))
    }
    assert users <= {"training/driver/estimator.py", "training/driver/model_io.py"}, users


def test_no_module_name_means_two_things():
    stems: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            stems.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    assert {stem: paths for stem, paths in stems.items() if len(paths) > 1} == {}


# One fresh interpreter answers the three questions that need one, in the order that keeps
# each answer clean: what `import deepspark` loads, then what the rank side loads, then whether
# every public name resolves (which loads the driver side). Each interpreter costs seconds of
# torch and torchmetrics imports, so the three share it.
FRESH_INTERPRETER_CHECKS = """
import importlib, json, sys
report = {}
import deepspark
report["heavy_after_root"] = sorted(
    m for m in ("pyspark", "torch", "pyarrow") if m in sys.modules
)
report["deepspark_after_root"] = sorted(m for m in sys.modules if m.startswith("deepspark."))
for name in RANK_SIDE:
    importlib.import_module(name)
report["pyspark_after_rank_side"] = sorted(
    m for m in sys.modules if m.split(".")[0] == "pyspark"
)
report["unresolved_public_names"] = [
    name for name in deepspark.__all__ if getattr(deepspark, name, None) is None
]
report["public_names_not_in_dir"] = sorted(set(deepspark.__all__) - set(dir(deepspark)))
try:
    deepspark.no_such_name
except AttributeError as error:
    report["unknown_name_error"] = str(error)
else:
    report["unknown_name_error"] = None
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict:
    code = f"RANK_SIDE = {RANK_SIDE!r}\n" + FRESH_INTERPRETER_CHECKS
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


def test_rank_side_imports_no_pyspark(fresh_interpreter):
    assert fresh_interpreter["pyspark_after_rank_side"] == []


def test_every_module_imports():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="deepspark."):
        importlib.import_module(info.name)


@pytest.mark.parametrize("name", RANK_SIDE)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0


# --- the engine's seam and the import graph -----------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_capabilities_reach_the_engine_only_through_its_public_modules():
    # The engine's driver/ and rank/ modules are its own: everything else uses
    # deepspark.training (engine, options, callbacks, model families) and nothing below it.
    internals = ("deepspark.training.driver", "deepspark.training.rank")
    wrong = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(PACKAGE / "training")
        for name in _imports(path)
        if name.startswith(internals)
    }
    assert not wrong, sorted(wrong)


def test_private_modules_are_imported_only_inside_their_package():
    # a module whose name (or a folder's) starts with "_" belongs to its room of the layout
    # (deepspark.training, deepspark.inference, ...): nothing outside imports it
    wrong = set()
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            private = [index for index, part in enumerate(parts) if part.startswith("_")]
            if private and not path.is_relative_to(PACKAGE.parent.joinpath(*parts[:2])):
                wrong.add(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, sorted(wrong)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the deepspark modules it imports anywhere in it (at the top, inside functions,
    under TYPE_CHECKING), package ``__init__`` files left out: they gather their package's
    names, and importing a module imports its package anyway."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name in packages:
            continue
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {other for other in found if other in modules and other not in packages}
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other_directly_or_in_a_circle():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# What only `deepspark.context` asks of Spark (DESIGN.md, "Layout"): Connect or classic, the
# master and its parsing, executors and task slots, the driver's address. Elsewhere code calls
# `deepspark.context.topology`; messages and docstrings may still name the confs.
TOPOLOGY_CONF_KEYS = {
    "pyspark.sql.connect",
    "spark.master",
    "spark.submit.deployMode",
    "spark.task.cpus",
    "spark.executor.cores",
    "spark.executor.instances",
    "spark.driver.host",
    "spark.driver.bindAddress",
}
MASTER_PREFIXES = {"local", "local[", "local-cluster", "local-cluster[", "spark://", "sc://"}
MASTER_PREFIXES |= {"k8s://", "yarn"}
TOPOLOGY_CALLS = {
    "defaultParallelism",
    "getExecutorIds",
    "getExecutorInfos",
    "getExecutorMemoryStatus",
    "maxNumConcurrentTasks",
    "cpu_count",
}


def _topology_questions(source: str, name: str) -> list[str]:
    """Each place in `source` that reads a topology conf, parses a master or counts slots."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            text = node.value if isinstance(node.value, str) else ""
            if text in TOPOLOGY_CONF_KEYS or re.search(r"local(-cluster)?\\\[|local\(", text):
                found.append(f"{where} {text!r}")
        elif isinstance(node, ast.Attribute):
            if node.attr in TOPOLOGY_CALLS:
                found.append(f"{where} .{node.attr}")
            elif node.attr == "master" and ast.unparse(node.value).endswith("sparkContext"):
                found.append(f"{where} sparkContext.master")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "match", "fullmatch")
            and any(
                isinstance(arg, ast.Constant) and arg.value in MASTER_PREFIXES for arg in node.args
            )
        ):
            found.append(f"{where} {ast.unparse(node)}")
    return found


def test_only_context_parses_masters_and_counts_slots():
    outside = [path for path in PACKAGE.rglob("*.py") if "context" not in path.parts]
    found = [
        place
        for path in outside
        for place in _topology_questions(path.read_text(), str(path.relative_to(PACKAGE)))
    ]
    assert not found, "ask deepspark.context.topology instead:\n" + "\n".join(found)


def test_the_topology_check_sees_the_patterns_it_forbids():
    # the check itself, on code written the way the deleted copies were
    sample = (
        "def slots(spark):\n"
        '    """Reads spark.task.cpus (a docstring may say so)."""\n'
        '    if spark.sparkContext.master.startswith("local"):\n'
        "        return spark.sparkContext.defaultParallelism\n"
        '    return int(spark.conf.get("spark.task.cpus"))\n'
    )
    found = _topology_questions(sample, "sample.py")
    lines = sorted(place.split()[0] for place in found)
    assert lines == ["sample.py:3", "sample.py:3", "sample.py:4", "sample.py:5"], found


def test_importing_the_package_loads_neither_pyspark_nor_torch(fresh_interpreter):
    assert fresh_interpreter["heavy_after_root"] == []
    assert fresh_interpreter["deepspark_after_root"] == []


def test_every_public_name_of_the_package_resolves(fresh_interpreter):
    assert fresh_interpreter["unresolved_public_names"] == []
    assert fresh_interpreter["public_names_not_in_dir"] == []
    assert "no_such_name" in (fresh_interpreter["unknown_name_error"] or "")


# --- sizes ---------------------------------------------------------------------------------------

# A module over MAX_MODULE_LINES lines, or a function over MAX_FUNCTION_LINES (its whole span:
# signature, docstring and body), says why it stays whole in a comment at its head that starts
# with SIZE_MARKER: a module among the lines between its docstring and its first statement, a
# function in the comment lines right above its `def` (or its decorators). Only src/ is checked:
# benchmarks/ are scripts whose `main` reads top to bottom.
SIZE_MARKER = "# size:"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _oversized(source: str, name: str) -> list[str]:
    """Each module or function of `source` over its size without a `# size:` head comment."""
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []
    body = tree.body
    has_docstring = (
        bool(body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    )
    first = body[1] if has_docstring and len(body) > 1 else (body[0] if body else None)
    head_end = first.lineno - 1 if first is not None else len(lines)
    head_start = body[0].end_lineno if has_docstring else 0
    if len(lines) > MAX_MODULE_LINES and not any(
        line.strip().startswith(SIZE_MARKER) for line in lines[head_start:head_end]
    ):
        found.append(f"{name}: {len(lines)} lines")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        top = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
        index = top - 2  # the line above, 0-based
        comments = []
        while index >= 0 and lines[index].strip().startswith("#"):
            comments.append(lines[index].strip())
            index -= 1
        if not any(comment.startswith(SIZE_MARKER) for comment in comments):
            found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_long_modules_and_functions_say_why_they_stay_whole():
    found = [
        place
        for path in sorted(PACKAGE.rglob("*.py"))
        for place in _oversized(path.read_text(), str(path.relative_to(PACKAGE)))
    ]
    assert not found, (
        f"split these, or say why one stays whole in a comment at its head starting with "
        f"{SIZE_MARKER!r} (modules over {MAX_MODULE_LINES} lines, functions over "
        f"{MAX_FUNCTION_LINES}):\n" + "\n".join(found)
    )


def test_the_size_check_sees_what_it_forbids():
    long_body = "".join(f"    x{index} = {index}\n" for index in range(MAX_FUNCTION_LINES))
    sample = (
        '"""A module."""\n\n'
        + "def long():\n"
        + long_body
        + "\n\n# size: one table, read top to bottom\n@staticmethod\ndef explained():\n"
        + long_body
        + "\n\ndef short():\n    return 1\n"
    )
    assert _oversized(sample, "sample.py") == [f"sample.py:3 long: {MAX_FUNCTION_LINES + 1} lines"]
    filler = "x = 1\n" * MAX_MODULE_LINES
    assert _oversized('"""A module."""\n' + filler, "big.py") == [
        f"big.py: {MAX_MODULE_LINES + 1} lines"
    ]
    assert _oversized('"""A module."""\n# size: a generated table\n' + filler, "big.py") == []
