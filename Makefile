# psr: `make demo` and `make test` work on a fresh machine (they create .venv and install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision must be a matching pair: torchvision ops fail to import otherwise.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/psr generate --ref examples/refs/subject-a.png --ref examples/refs/subject-b.png \
		"the cyan checkered heart creature above the orange checkered drop creature, in the sky" \
		--num-images 4 --sheet --out psr-out/demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests

# bench_core exits 1 when its numbers cannot be trusted (noise, a non-positive or constant
# result); on a busy machine try BENCH_CORE_ARGS="--threads 1 --clock cpu".
BENCH_CORE_ARGS ?=

bench: $(STAMP)
	$(PY) bench/bench_core.py $(BENCH_CORE_ARGS)
	OMP_NUM_THREADS=1 $(PY) bench/bench_toyworld.py
	$(PY) bench/bench_synth.py
	OMP_NUM_THREADS=1 $(PY) bench/bench_regularizers.py
	$(PY) bench/bench_toy_perception.py
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_rl.py

clean:
	rm -rf $(VENV) psr-out .pytest_cache
