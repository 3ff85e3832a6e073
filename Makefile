# Two commands on a fresh machine with Python 3.10-3.13: `make run` and `make test` (`make test-all`: CI).
# uv installs the locked dependencies (uv.lock) into .venv; uv itself goes into .tools.
PYTHON ?= python3
UV := .tools/bin/uv
VENV := .venv/bin

.PHONY: setup run test test-all lint docs bench bench-gpu clean docker docker-test

setup: .venv/.synced

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check "uv==0.13.8"

# --compile-bytecode: the .pyc files written once, here; where PYTHONDONTWRITEBYTECODE is set (as on CI), Python
# would otherwise compile torch and Avalanche from source at every start (22 s instead of 7 s here)
.venv/.synced: pyproject.toml uv.lock | .tools/bin/uv
	$(UV) sync --frozen --compile-bytecode
	touch $@

run: setup  ## the default experiment: split digits, live vs EMA
	$(VENV)/python -m cl_ema $(ARGS)

PYTEST := $(VENV)/python -m pytest -q -n auto --dist worksteal --durations=15

test: setup  ## the test suite without the tests that start fresh Python processes (CPU), a worker per core
	$(PYTEST) -m "not slow" $(ARGS)

test-all: setup  ## every test (what CI runs): torchrun, submitit, signals, concurrent runs too
	$(PYTEST) $(ARGS)

lint: setup  ## ruff (lint and format), mypy (types) and the layering contract (import-linter), as CI runs them
	$(VENV)/ruff check cl_ema tests benchmarks
	$(VENV)/ruff format --check cl_ema tests benchmarks
	$(VENV)/mypy
	$(VENV)/lint-imports

docs: setup  ## the documentation site (docs/, mkdocs.yml), warnings as errors; built outside the repository
	NO_MKDOCS_2_WARNING=1 $(VENV)/mkdocs build --strict --site-dir "$${TMPDIR:-/tmp}/cl_ema_site"

bench: setup  ## EMA update speed (see README, "Benchmarks")
	$(VENV)/python benchmarks/ema_update.py $(ARGS)

clean:  ## the environment and caches; never results (outputs/, multirun/, wandb/ stay)
	rm -rf .venv .tools .pytest_cache .ruff_cache .mypy_cache dist build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

bench-gpu: setup  ## every GPU measurement of the README in one go (< 8 min on a CUDA machine)
	bash benchmarks/gpu.sh

docker:  ## the image cl_ema (docs/docker.md); PYTHON_IMAGE=… builds on another base than the pinned one
	docker build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -f docker/Dockerfile -t cl_ema .

docker-test: setup  ## builds the image as cl_ema:test and runs it (skipped without a Docker daemon); takes minutes
	$(VENV)/python -m pytest -q -p no:xdist -m docker tests/test_docker.py $(ARGS)
