# The two commands a newcomer types: `make run` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rayvid-installed
SAMPLES ?= samples
OUT    ?= out
MODEL  ?= $(SAMPLES)/model/shapes.keras
ARGS   ?=
PYTEST_ARGS ?=
# pytest workers (pytest-xdist), each its own session: one Ray, one S3 and one GCS server each;
# 0: one session in this process
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=

.PHONY: setup run test bench lock clean

setup: $(STAMP)

# Re-installs whenever pyproject.toml or the lock file changes (a stale .venv).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# The main job on an embedded local Ray over generated sample videos, offline.
# `make run MODEL=resnet50` runs ImageNet ResNet-50 instead (weights from Keras' cache).
run: $(STAMP)
	$(BIN)/python -m rayvid samples $(SAMPLES) > /dev/null
	@# each demo run starts from a fresh out/ (an earlier rayvid output there); any other
	@# OUT=... is never deleted: the run resumes into it
	@if [ "$(OUT)" = out ] && [ -d out/runs ]; then rm -rf out; fi
	$(BIN)/rayvid run $(SAMPLES)/videos $(OUT) --model $(MODEL) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# rayvid against a serial loop, tf.data and Ray Data's own recipe, side by side on
# generated videos; logs tables on stderr, writes bench/last_run.json (and the JSON to stdout) (BENCHMARKS.md's record is
# bench/results.json, never overwritten). ~45 min.
bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Refresh the pinned versions of every package (run after editing pyproject.toml): resolves
# pyproject.toml afresh (rayvid and its `test` extra, what `make setup` installs from the
# lock) in a throwaway virtual environment, never .venv (which may hold other packages), and
# pins all of it but rayvid. Downloads everything (TensorFlow, Ray: minutes); use the Python
# the lock is for (PYTHON=python3.11). requirements.lock is replaced only on success; so is
# cluster/requirements-gpu.lock, the pins of the CUDA wheels of that TensorFlow (the image's).
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q ".[test]"; \
	"$$tmp/venv/bin/python" -m pip freeze --exclude-editable > "$$tmp/freeze.txt"; \
	grep -v -i -E '^rayvid([ =@]|$$)' "$$tmp/freeze.txt" > "$$tmp/requirements.lock"; \
	"$$tmp/venv/bin/python" cluster/cuda_pins.py > "$$tmp/requirements-gpu.lock"; \
	mv "$$tmp/requirements-gpu.lock" cluster/requirements-gpu.lock; \
	mv "$$tmp/requirements.lock" requirements.lock

# The demo's files: samples and `make run`'s own out/ (an OUT=DIR given to `make run` is the
# user's output, as it never deletes it: not deleted here either).
clean:
	rm -rf out $(SAMPLES) .pytest_cache
