# vfuserver: the two commands of the README, and what they need.
#   make demo   set up everything, start vfuserver, boot a guest against it, show what it sees
#   make test   set up everything, run ruff, mypy, the import contracts and the whole test
#               suite (incl. QEMU e2e)
# Both are idempotent: set-up steps are skipped when their result is up to date.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .deps/stamps
SETUP_INPUTS := pyproject.toml setup.py vfuserver/_build.py vfuserver/decl/libvfio-user.h \
                $(wildcard vfuserver/csrc/*.c vfuserver/csrc/*.h) \
                scripts/get-libvfio-user.sh

.PHONY: setup system-packages test lint demo bench clean

setup: $(STAMPS)/installed

$(STAMPS)/system-packages: scripts/system-packages.sh
	@mkdir -p $(STAMPS)
	scripts/system-packages.sh
	@touch $@

$(STAMPS)/libvfio-user: $(STAMPS)/system-packages scripts/get-libvfio-user.sh
	scripts/get-libvfio-user.sh >/dev/null
	@touch $@

$(STAMPS)/installed: $(STAMPS)/libvfio-user $(SETUP_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi > .deps/pip.log 2>&1 || { cat .deps/pip.log; exit 1; }
	$(PY) -m pip install --no-build-isolation -e '.[test]' >> .deps/pip.log 2>&1 || { cat .deps/pip.log; exit 1; }
	$(PY) -c 'import vfuserver.binding'
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .
	scripts/typecheck.sh
	scripts/lint-imports.sh

test: lint
	$(PY) -m pytest

demo: setup
	scripts/demo.sh

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf .deps $(VENV) build *.egg-info vfuserver/_vfu_cffi*
