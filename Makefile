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

demo: install  ## the main job on built-in defaults: a search on the bundled digits demo
	$(VENV)/bin/autoft search

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) studies/*.db studies/artifacts runs
