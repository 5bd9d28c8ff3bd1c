# Two entry points on a fresh machine: `make demo` (install + the main job) and
# `make test` (install + the test suite). torch is pinned here to the CPU build; the
# package itself accepts torch>=2.4.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-fast

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m meshplan.cli simulate --model gpt3-175b --hardware a100-80gb --gpus 1024 \
	  --gpus-per-node 8 --global-batch 1536 --seq-len 2048 --tp 8 --pp 8 --dp 16 \
	  --micro-batch 1 --schedule 1f1b --recompute full --zero 1 \
	  --trace out/gpt3-175b.trace.json --timeline out/gpt3-175b.timeline.html

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"
