# lowrank-train: the two commands a user needs are `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install train test lint bench

# Skipped where the package already imports (-P keeps this checkout off sys.path, so an
# uninstalled source tree does not pass). torch==2.13.0 goes first: a bare torch pulls CUDA.
install:
	@if [ -x $(BIN)/python ] && $(BIN)/python -P -c "import lowrank_train, torch, transformers, pytest" 2>/dev/null; then \
		echo "lowrank-train is installed in $(VENV)"; \
	else \
		[ -x $(BIN)/python ] || $(PY) -m venv $(VENV); \
		$(BIN)/pip install -q torch==2.13.0 && \
		$(BIN)/pip install -q -e '.[dev]'; \
	fi

train: install
	$(BIN)/lowrank-train train configs/runs/quickstart.yaml $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check lowrank_train tests benchmarks scripts
	$(BIN)/ruff format --check lowrank_train tests benchmarks scripts

# The 24 GB benchmark (README, "24 GB benchmark"): e.g. make bench ARGS="--cache DIR --sizes 7b"
bench: install
	$(BIN)/python benchmarks/bench_train.py $(ARGS)
