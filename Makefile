# dinoforge: `make test` sets up a fresh machine (venv, package, system packages) and runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Empty: the whole suite but `gpu`, as two pytest processes side by side (tests/run_suite.sh); else one pytest run
# with these arguments.
PYTEST_ARGS ?=

.PHONY: test venv system-deps lint bench gpu-check clean

test: venv system-deps
	$(VENV)/bin/ruff check .
ifeq ($(strip $(PYTEST_ARGS)),)
	bash tests/run_suite.sh $(PY)
else
	$(PY) -m pytest $(PYTEST_ARGS)
endif

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

# Slurm and munge back the local-cluster tests; installed only when we may (root with apt-get).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		command -v slurmctld >/dev/null && command -v munged >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null || \
		  echo "Slurm/munge install failed: slurm-marked tests will skip"; }; \
	else echo "not root: skipping Slurm/munge install (slurm-marked tests will skip)"; fi

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# One GPU, at most 8 minutes, one JSON summary (README "GPU check"); needs no venv: the GPU machine's python3, wheels/.
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
