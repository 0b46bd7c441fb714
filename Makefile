# One venv, two jobs: `make demo` (the main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test clean guard-data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo,vit]'
	@$(MAKE) --no-print-directory guard-data
	touch $@

# Fashion-MNIST from Debian: the shipped recipes' guard suite that a fresh machine can have and
# both embedded bases read above chance (builtin:fashion-mnist). Needs root; says so otherwise.
guard-data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: apt-get install dataset-fashion-mnist failed: the recipes' fashion-mnist guard suite will be missing"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the recipes' fashion-mnist guard suite"; fi

demo: setup
	bash examples/textile_demo.sh demo-ws

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf demo-ws .pytest_cache
