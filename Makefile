# Two commands do everything (see README): `make demo` and `make test`. Both are idempotent:
# the virtual environment is rebuilt only when a pin changes, and fetching verifies the cache.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
INSTALLED := $(VENV)/.installed

.PHONY: setup fetch demo test bench-extras clean-cache

$(INSTALLED): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

setup: $(INSTALLED)

fetch: setup
	$(PY) -m course_lib.fetch

demo: fetch
	$(PY) -m course_lib demo

test: fetch
	$(PY) -m pytest -q

# Baselines the benchmarks compare against, kept out of the course's own environment pins.
bench-extras: setup
	$(PIP) install --no-deps -r benchmarks/requirements-extras.txt

clean-cache:
	rm -rf data/cache
