# Two commands a user needs (see README): `make demo` runs the main job, `make test` the tests.
# Each creates a local virtual environment (.venv) and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo smoke test test-all install clean

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

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) build *.egg-info
