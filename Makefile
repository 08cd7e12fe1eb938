# One-command set-up on a fresh Debian machine with Python 3.11 (run as root).
#   make demo   - install everything, then run the demo
#   make test   - install everything, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := libxc-dev libopenblas-dev libsuitesparse-dev pkg-config g++ make

.PHONY: all install sysdeps test test-all lint format demo clean

all: install

# Debian packages: libxc and OpenBLAS for GPAW, SuiteSparse (CHOLMOD) for the
# sparse Cholesky of S behind KPM, a C++ compiler (GPAW's C
# sources build as C++), venv and Python headers when the interpreter lacks them.
sysdeps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c "import venv, ensurepip" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	$(PYTHON) -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The virtual environment is rebuilt only when the pinned requirements change.
$(STAMP): requirements.lock setup.cfg pyproject.toml
	$(MAKE) sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	CC=g++ $(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# two worker processes, one test file each at a time (session fixtures per worker)
PYTEST := $(PY) -m pytest -n 2 --dist loadfile

test: install
	$(PYTEST) -m "not slow"

# ruff (lint and format, configured in pyproject.toml) and the import-layer
# contract (setup.cfg [importlinter]); CI runs this before the tests
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-all: install
	$(PYTEST)

demo: install
	$(PY) -m ase_gearsh.demo --output demo-output

clean:
	rm -rf $(VENV) demo-output .pytest_cache
