# Two commands for a new user: `make demo` (the main job) and `make test`. Both set up first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: setup data test-deps test demo lint bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; torch/torchvision come from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST, real data, from Debian's package (needs root; prints how otherwise).
data:
	@if [ -f $(FASHION)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi

# Two test processes: much of a sweep test runs on one core (the launcher's start, its
# closing export) while the other waits. `pytest` alone runs them one at a time. The slowest
# are listed.
# What the tests start for real (PostgreSQL; pdflatex with booktabs for the LaTeX export;
# Fashion-MNIST; a one-node SLURM cluster with munge; headless Chromium for the report):
# installed from Debian as root; otherwise the tests that need them skip and say why.
test-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  need=""; \
	  [ -f $(FASHION)/train-images-idx3-ubyte.gz ] || need="$$need dataset-fashion-mnist"; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	  command -v pdflatex >/dev/null || need="$$need texlive-latex-base texlive-latex-recommended"; \
	  command -v slurmctld >/dev/null || need="$$need slurm-wlm"; \
	  command -v munged >/dev/null || need="$$need munge"; \
	  command -v chromium >/dev/null || need="$$need chromium"; \
	  if [ -n "$$need" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$need) >/dev/null; \
	  fi; \
	fi

test: setup test-deps
	$(BIN)/pytest -n 2 --durations=15

# The quickstart sweep (resumable: run it again to continue), then its exports.
demo: setup data
	$(BIN)/ablate sweep sweeps/quickstart.yaml --workers 2
	$(BIN)/ablate status quickstart
	$(BIN)/ablate export quickstart
	$(BIN)/ablate report quickstart

# CPU benchmarks, side by side in one process each; JSON in benchmarks/results/ (< 10 min).
bench: setup
	$(BIN)/python -m benchmarks.run_all --out benchmarks/results

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs
