# Two commands do everything (see README): `make demo` and `make test`. Both are idempotent:
# the virtual environment is rebuilt only when a pin changes, and fetching verifies the cache.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip compiles every module to bytecode as it installs (48 s of the set-up on 2 cores). Keep it: where
# PYTHONDONTWRITEBYTECODE is set (as on the machines this course is developed on), a module left
# uncompiled is compiled again at every import, in every kernel and subprocess (5-10 s each).
PIP := $(PY) -m pip --disable-pip-version-check -q
INSTALLED := $(VENV)/.installed
BROWSER_INSTALLED := $(VENV)/.browser-installed
CHROMIUM := /usr/bin/chromium
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

.PHONY: setup fetch baseline demo test browser bench-extras clean-cache

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

# The MiniLM baseline the notebooks and tests/ read, fine-tuned once on all the cores (nothing to
# do when cached) before the test workers share them.
baseline: setup
	$(PY) -m course_lib.fetch --baseline

demo: fetch
	$(PY) -m course_lib demo

$(BROWSER_INSTALLED): requirements-browser.txt $(INSTALLED)
	$(PIP) install -r requirements-browser.txt
	touch $@

# What tests/test_browser_widgets.py drives: Playwright (pinned) and Debian's chromium, installed
# only when missing and only as root or with password-less sudo. Where it cannot be installed the
# test skips and says why (`make test` lists skip reasons), so this step never fails the suite.
browser: $(BROWSER_INSTALLED)
	@if [ -x $(CHROMIUM) ]; then :; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "browser: no apt-get here; tests/test_browser_widgets.py will skip" >&2; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && $(APT_CHROMIUM)) || echo "browser: apt-get could not install chromium" >&2; \
	elif sudo -n true 2>/dev/null; then \
	  (sudo apt-get update -q && sudo env $(APT_CHROMIUM)) || echo "browser: apt-get could not install chromium" >&2; \
	else \
	  echo "browser: $(CHROMIUM) missing and neither root nor sudo; tests/test_browser_widgets.py will skip" >&2; \
	fi

# First tests/ and the notebooks that time nothing, on two pytest-xdist workers with half the cores
# each (--dist loadfile: a notebook's cells stay in one kernel, in order; the notebooks are handed out
# first, see conftest.py); then the notebooks that time models (conftest.TIMED_NOTEBOOKS), in one
# process on all the cores: their timing cells need the machine to themselves. Both phases always
# run; make test fails if either fails. Before them, the baseline's fine-tuning (compute) and the
# browser's install (downloads and dpkg: ~30 s on a fresh machine) overlap, as two make jobs.
test: setup
	$(MAKE) --no-print-directory -j2 baseline browser
	status=0; \
	$(PY) -m pytest -q -rs --durations=15 -n 2 --dist loadfile --no-loadscope-reorder -m "not timed" tests notebooks || status=$$?; \
	$(PY) -m pytest -q -rs --durations=15 -m timed notebooks || status=$$?; \
	exit $$status

# Baselines the benchmarks compare against, kept out of the course's own environment pins.
bench-extras: setup
	$(PIP) install --no-deps -r benchmarks/requirements-extras.txt

clean-cache:
	rm -rf data/cache
