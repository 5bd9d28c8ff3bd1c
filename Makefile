# Two entry points on a fresh machine: `make demo` (install + the main job) and
# `make test` (install + the test suite), both in the project virtualenv $(VENV) (.venv/
# by default; system Pythons refuse `pip install` outside one, PEP 668). torch is pinned
# here to the CPU build; the package's own lower bound is in pyproject.toml.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PIP ?= $(PYTHON) -m pip

.PHONY: install install-exports browser demo test test-fast

$(PYTHON):
	python3 -m venv $(VENV)

install: $(PYTHON)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

# The frameworks whose own validation checks the exports (tests/test_export_conformance.py):
# their light dependencies through the `exports` extra, the frameworks without theirs so that
# no other torch (or CUDA build) comes in; DeepSpeed without compiling its ops.
install-exports: install
	$(PIP) install -q -e ".[test,exports]"
	$(PIP) install -q --no-deps torchtitan==0.3.0 vllm==0.33.0
	DS_BUILD_OPS=0 $(PIP) install -q --no-deps --no-build-isolation deepspeed==0.19.8

# Headless Chromium renders the what-if report in its test (Debian package `chromium`).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

MESHPLAN = $(PYTHON) -m meshplan.cli
CLUSTER = --hardware a100-80gb --gpus 1024 --gpus-per-node 8 --global-batch 1536 --seq-len 2048

# The main job: plan GPT-3 175B on 1024 A100s (ranked table + why), simulate the Megatron-LM
# configuration with its pipeline timeline, write the what-if report, then run a scaled-down
# plan on this machine's ranks with predicted vs measured.
demo: install
	mkdir -p out
	$(MESHPLAN) plan --model gpt3-175b $(CLUSTER) --top 5
	$(MESHPLAN) simulate --model gpt3-175b $(CLUSTER) --tp 8 --pp 8 --dp 16 --micro-batch 1 \
	  --schedule 1f1b --recompute full --zero 1 \
	  --trace out/gpt3-175b.trace.json --timeline out/gpt3-175b.timeline.html
	$(MESHPLAN) whatif --model gpt3-175b --hardware a100-80gb,h100-80gb --gpus 256,512,1024 \
	  --global-batch 1536 --seq-len 2048 --scale-inter-node-bw 0.5,1,2 --out out/whatif.html
	$(MESHPLAN) run --model examples/tiny-llama/config.json --hardware local --gpus 2 --tp 2 --sp \
	  --global-batch 8 --micro-batch 2 --seq-len 128 --steps 10
	$(MESHPLAN) plan --mode inference --model llama-3-70b --hardware h100-80gb --gpus 8 \
	  --prompt-len 1024 --gen-len 256 --slo-ttft-ms 500 --slo-tpot-ms 50 --top 5
	$(MESHPLAN) run --mode inference --model examples/tiny-llama/config.json --hardware local \
	  --gpus 2 --tp 2 --batch 4 --prompt-len 64 --gen-len 32

# The tests in three passes: those that run in this process, then the slow ones, which launch
# ranks, each on a worker per core (pytest-xdist, a test file to a worker); then those that
# assert on measured times, one at a time so that they have the cores they measure. All
# three run, and any failing fails. The slow pass on two workers takes 8.7 min on the 2-core
# VM against 9.6 min in one (2026-12-03): the ranks of one launch leave a quarter of the
# cores idle (startup, rendezvous, waits). The last two passes collect only the files that
# use their marker (collecting every test takes 13 s). --durations: the slowest tests, so
# that the suite can be kept under its 15 minutes.
PYTEST_PARALLEL = -n auto --dist loadfile
SLOW_FILES = $(shell grep -l 'mark\.slow' tests/*.py)
TIMED_FILES = $(shell grep -l 'mark\.timed' tests/*.py)
test: install install-exports browser
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_PARALLEL) --durations=15; fast=$$?; \
	$(PYTHON) -m pytest -q -m "slow and not timed" $(PYTEST_PARALLEL) --durations=15 $(SLOW_FILES); slow=$$?; \
	$(PYTHON) -m pytest -q -m timed --durations=5 $(TIMED_FILES); timed=$$?; \
	[ $$fast -eq 0 ] && [ $$slow -eq 0 ] && [ $$timed -eq 0 ]

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_PARALLEL)
