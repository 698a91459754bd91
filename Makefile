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

.PHONY: setup system-packages test lint demo bench fuzz fuzz-keep clean

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
	$(PY) -m pip install --no-build-isolation --only-binary=atheris -e '.[test]' >> .deps/pip.log 2>&1 || { cat .deps/pip.log; exit 1; }
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

# Coverage-guided fuzzing (tests/fuzz): every target, or FUZZ_TARGET, for FUZZ_SECONDS each,
# one after the other. New inputs go to .deps/fuzz/<target>, a finding to
# .deps/fuzz/<target>-crash-*; `make fuzz-keep` adds to the corpus kept in the repo
# (tests/fuzz/corpus/<target>) a smallest set of the new inputs that reach code it does not
# (a set cover over edges, not hit counts: a few dozen small files per target).
FUZZ_SECONDS ?= 60
FUZZ_TARGET ?= $(shell $(PY) -m tests.fuzz --list 2>/dev/null)
FUZZ_OPTIONS ?= -timeout=10 -rss_limit_mb=2048 -print_final_stats=1

fuzz: setup
	@for target in $(FUZZ_TARGET); do \
	    mkdir -p .deps/fuzz/$$target && \
	    echo "fuzz: $$target for $(FUZZ_SECONDS) s" && \
	    $(PY) -m tests.fuzz $$target -max_total_time=$(FUZZ_SECONDS) $(FUZZ_OPTIONS) \
	        -artifact_prefix=.deps/fuzz/$$target- .deps/fuzz/$$target tests/fuzz/corpus/$$target \
	        || exit 1; \
	done

fuzz-keep: setup
	@for target in $(FUZZ_TARGET); do \
	    $(PY) -m tests.fuzz $$target -set_cover_merge=1 -use_counters=0 $(FUZZ_OPTIONS) \
	        tests/fuzz/corpus/$$target \
	        .deps/fuzz/$$target || exit 1; \
	done

clean:
	rm -rf .deps $(VENV) build *.egg-info vfuserver/_vfu_cffi*
