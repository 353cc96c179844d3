# Two commands for a new user: `make demo` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A plain `torch` requirement pulls a multi-GB CUDA build; on a CPU machine pin the CPU build first.
# On a GPU machine: `make TORCH=torch test` (or any torch you already have in the venv).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install bench mutation clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gvpo train overwrite_output_dir=true  # a second `make demo` replaces runs/default

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/rollout.py --reps 3
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/math_grader.py

# Plants known faults (pi_theta', micro-batching, bf16, checkpointing, resume state, ...) one at a time in a copy
# and checks that the tests catch each: a table of caught / missed, non-zero exit on a miss.
mutation: $(STAMP)
	$(PY) scripts/mutation.py

# On a GPU machine as it comes (torch, transformers, accelerate, peft): no venv, no install (README "GPU check").
.PHONY: gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
