# The two commands of the README: `make demo` and `make test`, each from nothing but Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned (TORCH_VERSION). pip takes it from its configured index; on a
# machine without a GPU pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build instead
# of a multi-GB CUDA one, or leave it empty on a GPU machine.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
TORCH_INDEX_FLAG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX_FLAG)
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

install: $(VENV)/.installed

# DEMO_ARGS=--extend runs the extended-vocabulary recipe (tools/demo.py --help)
DEMO_ARGS ?=

demo: $(VENV)/.installed
	$(PY) tools/demo.py --config configs/demo_270m.yaml $(DEMO_ARGS)

# One pytest-xdist worker per core; each test file runs on one worker, so a file's shared launches
# (tests/_matrix_launch.py) start once. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= auto

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) build outputs
