# edgediff: `make demo` and `make test` work on a fresh machine; every target prepares .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup cross-toolchain demo test lint bench clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned resolve pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# aarch64 cross compilers for the arm-a78 / arm-a55 / adreno-740 builds (Debian packages).
cross-toolchain:
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || { \
	  echo "installing g++-aarch64-linux-gnu"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; }

demo: setup cross-toolchain
	$(PY) -m edgediff.demo --output demo-out

test: setup cross-toolchain
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check edgediff tests benchmarks
	$(PY) -m ruff format --check edgediff tests benchmarks

clean:
	rm -rf demo-out .pytest_cache build
