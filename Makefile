# Two commands a user needs: `make demo` (main job) and `make test`. Both set up .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
# CUDA users who already have a torch: `make setup TORCH= VENV_FLAGS=--system-site-packages`
TORCH ?= torch==2.13.0
VENV_FLAGS ?=
STAMP := $(VENV)/.tmt_pyg_installed
# Recent setuptools (>= 80) compile C++ with CXXFLAGS, which replaces the interpreter's flags (-g -O3 ...):
# without it the extensions are built with debug info, about twice the compile time.
BUILD_EXT := DIST_EXTRA_CONFIG=$(CURDIR)/.ci/build_ext.cfg CFLAGS="-g0 -O2 -DNDEBUG" CXXFLAGS="-g0 -O2 -DNDEBUG"

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(if $(TORCH),$(PIP) install -q "$(TORCH)")
	# both compiled at once, each building its extensions in parallel (they turn ninja off), no debug info
	$(PY) -c "import torch_scatter" 2>/dev/null || $(BUILD_EXT) $(PIP) install -q --no-build-isolation torch-scatter==2.1.2 & \
	$(PY) -c "import torch_cluster" 2>/dev/null || $(BUILD_EXT) $(PIP) install -q --no-build-isolation torch-cluster==1.6.3 & \
	wait %1 && wait %2
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/tmt-pyg demo

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
