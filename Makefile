# The two commands a newcomer needs: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench

# Installs the project with its test extras. Where no torch is installed yet, torch 2.13.0 is taken
# first (on the project's CPU machines pip finds a CPU build of exactly that version on disk).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest tests -q

bench: install
	$(PYTHON) -m benchmarks.run --preset cpu
