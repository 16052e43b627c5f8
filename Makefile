# One virtualenv for everything; torch is pinned to the builds these machines carry on disk.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install  ## the main job: a search on the bundled digits demo (8x8-pixel digits: 64 px is plenty, and fast on a CPU)
	$(VENV)/bin/autoft search --image-size 64

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) studies/*.db studies/artifacts runs
