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

# The paper's four findings at the regime that teaches (docs/results/README.md): the Optuna grid studies
# sweeps/optuna/findings_text_*.yaml (both orders of BBQ/CSQA and ToxiGen/ARC-Easy, SAM and the replay grid on
# BBQ/CSQA, the order study on Gemma-3-270M, the new mitigations), two one-thread workers each, then the tables,
# run records and reports in docs/results/text-regime. About 9 hours on a 2-core CPU. The studies' storage and
# runs live in FINDINGS_DIR (the stage cache in the user cache), never only in the work tree: `make findings` again
# picks up where a killed one stopped (a killed trial is retried once its heartbeat is 30 s stale), and FINDINGS_DIR
# on a shared disk lets other machines join. Each finished chain prints a progress line with the time left.
# The letter-answer study of docs/results/ (before the regime search): sweeps/optuna/findings_{order,replay,sam}.yaml.
FINDINGS_DIR ?= $(HOME)/.cache/chainforget/findings-text
FINDINGS_STUDIES ?= order_toxigen order_bbq mitigations replay sam order_gemma
findings: setup
	mkdir -p $(FINDINGS_DIR)
	for study in $(FINDINGS_STUDIES); do \
	  for worker in 1 2; do \
	    CHAINFORGET_THREADS=1 $(BIN)/chainforget sweep optuna sweeps/optuna/findings_text_$$study.yaml \
	      --storage sqlite:///$(FINDINGS_DIR)/findings.db --out $(FINDINGS_DIR)/runs $(FINDINGS_ARGS) & \
	  done; wait; \
	done
	$(BIN)/python -m analysis.findings $(FINDINGS_DIR)/runs docs/results/text-regime

test: setup
	PATH="$(abspath $(BIN)):$$PATH" WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

# ruff: pycodestyle errors (lines up to 120 characters), pyflakes, import order, and the formatter's layout
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
