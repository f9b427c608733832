# make demo: set up (once) and run the default experiment.   make test: set up (once) and run the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build, pinned (an unpinned torch pulls gigabytes of CUDA packages). GPU users: see README.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint smoke findings clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/chainforget demo

smoke: setup
	$(BIN)/chainforget chain --config sweeps/configs/smoke.yaml

# The paper's four findings at CPU scale (docs/results/README.md): the Optuna grid studies, two one-thread
# workers each, then the tables, run records and report in docs/results. About 1.5 hours on a 2-core CPU.
# The studies' storage and runs live in FINDINGS_DIR (the stage cache in the user cache), never only in the work
# tree: `make findings` again picks up where a killed one stopped (a killed trial is retried once its heartbeat is
# 30 s stale), and FINDINGS_DIR on a shared disk lets other machines join. Each finished chain prints a progress
# line with the time left. Offline: make findings FINDINGS_ARGS="--config sweeps/configs/shared_data.yaml"
FINDINGS_DIR ?= $(HOME)/.cache/chainforget/findings
findings: setup
	mkdir -p $(FINDINGS_DIR)
	for study in order replay replay_toxigen sam; do \
	  for worker in 1 2; do \
	    CHAINFORGET_THREADS=1 $(BIN)/chainforget sweep optuna sweeps/optuna/findings_$$study.yaml \
	      --storage sqlite:///$(FINDINGS_DIR)/findings.db --out $(FINDINGS_DIR)/runs $(FINDINGS_ARGS) & \
	  done; wait; \
	done
	$(BIN)/python -m analysis.findings $(FINDINGS_DIR)/runs docs/results

test: setup
	PATH="$(abspath $(BIN)):$$PATH" WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

# ruff: pycodestyle errors (lines up to 120 characters), pyflakes, import order, and the formatter's layout
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
