# `make demo` and `make test` create .venv when missing (CPU torch first, so that nothing pulls a
# multi-GB CUDA build), then run the job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: demo test benchmark clean-venv

$(BIN)/condiff: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(BIN)/condiff

demo: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/condiff demo --output runs/demo --overwrite

test: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

benchmark: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/step_time.py

clean-venv:
	rm -rf $(VENV)
