# The README's commands. `make serve` and `make test` each set up everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build from the machine's local wheel; other spellings fetch a multi-GB CUDA build.
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench gpu-check clean

$(BIN)/charlm: pyproject.toml charlm/_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/charlm

serve: install
	$(BIN)/charlm serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/ruff check charlm app tests benchmarks scripts
	$(BIN)/mypy --explicit-package-bases charlm app tests
	$(BIN)/pytest

bench: install
	$(BIN)/python -m benchmarks.train_speed
	$(BIN)/python -m benchmarks.generate_speed
	$(BIN)/python -m benchmarks.load

# On a machine with CUDA (under 8 minutes): the CUDA tests, 60 s of training, decode at batch 256 and 1024,
# one JSON report. Where `install` cannot fetch a CUDA torch, run `PYTHONPATH=. python scripts/gpu_check.py
# --out gpu-check.json` with the machine's own torch instead.
gpu-check: install
	$(BIN)/python scripts/gpu_check.py --out gpu-check.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
