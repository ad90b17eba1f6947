# Two commands a user needs (see README): `make demo` runs the main job, `make test` the tests.
# Each creates a local virtual environment (.venv) and installs what it needs on first use.
# `make test-tpu` (CI runs it after `make test`) compiles for real TPU topologies with libtpu
# in a second environment (.venv-tpu), so the main one never sees libtpu.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TPU_VENV ?= .venv-tpu
TPU_BIN := $(TPU_VENV)/bin

.PHONY: demo smoke test test-all test-tpu install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Main job: format specialization and ProMoT reproduced offline on a tiny T5 (promot demo).
demo: install
	$(BIN)/promot demo --out_dir out/demo

smoke: install
	$(BIN)/promot smoke --model mt5_small --prompt_length 100

# The suite runs in TEST_WORKERS pytest-xdist processes, whole test files to one worker (their
# module fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(PYTEST)

test-all: install
	$(PYTEST) -m ""

$(TPU_BIN)/activate:
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_BIN)/pip install --quiet --upgrade pip

$(TPU_VENV)/.installed: setup.py $(TPU_BIN)/activate
	$(TPU_BIN)/pip install --quiet -e ".[tpu]" "pytest>=8"
	touch $@

# Only the tests marked `libtpu` (tests/test_plan.py); they fail rather than skip here.
test-tpu: $(TPU_VENV)/.installed
	PROMOT_REQUIRE_LIBTPU=1 $(TPU_BIN)/python -m pytest -q -m libtpu tests/test_plan.py

clean:
	rm -rf $(VENV) $(TPU_VENV) build *.egg-info
