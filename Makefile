# One venv, two jobs: `make demo` (the main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo,vit]'
	touch $@

demo: setup
	bash examples/textile_demo.sh demo-ws

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf demo-ws .pytest_cache
