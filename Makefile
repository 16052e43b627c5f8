# One virtualenv for everything; torch is pinned to the builds these machines carry on disk.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.14.1 torchvision==0.29.1
# Without an NVIDIA GPU (no nvidia-smi), PyTorch's CPU wheels: its +cpu build outranks PyPI's CUDA one (~5 GB of
# CUDA libraries the CPU never uses). Offline, that index fails at once (--retries 0) and the pins above install
# from wherever pip finds them. `make install TORCH_INDEX=` keeps PyPI's build; another URL picks another build.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--retries 0 --extra-index-url $(TORCH_INDEX)) $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed  ## then .venv/bin/autoft, or `source .venv/bin/activate` to have autoft on the PATH

demo: install  ## the main job: a search on the bundled digits demo (8x8-pixel digits: 64 px is plenty, and fast on a CPU)
	$(VENV)/bin/autoft search --image-size 64

test: install  ## the whole suite
	$(PY) -m pytest

test-fast: install  ## the fast subset while you work: nothing that trains for long or starts a CLI process
	$(PY) -m pytest -m "not slow"

lint: install  ## as CI runs it
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) studies/*.db studies/artifacts runs
