# Newcomer entry points: `make demo`, `make test` and `make docs` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per set of extras installed into the venv (demo: vhsm alone).
DEMO := $(VENV)/.installed-demo
DOCS := $(VENV)/.installed-docs
DEV := $(VENV)/.installed-dev
export NO_MKDOCS_2_WARNING := 1
# The optional C accelerator of the data path, built in place (pip install -e builds it too;
# without a C compiler the build says so in one line and vhsm runs its pure-Python path).
SPEEDUPS := vhsm/_speedups$(shell $(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX") or ".so")')
# The data-path tests, run a second time on the pure-Python path (VHSM_PURE_PYTHON=1).
DATA_PATH_TESTS := tests/test_virtq_split.py tests/test_virtq_packed.py tests/test_virtq_fastpath.py \
	tests/test_vring.py tests/test_devices_net.py tests/test_net_checksum.py tests/test_fuzz_guest.py \
	tests/test_inflight.py tests/test_fuzz_rings.py
# The hostile-ring tests `make asan` runs against an AddressSanitizer build of the accelerator.
ASAN_TESTS := tests/test_speedups.py tests/test_virtq_split.py tests/test_virtq_packed.py \
	tests/test_virtq_fastpath.py tests/test_devices_net.py tests/test_net_checksum.py \
	tests/test_fuzz_rings.py tests/test_virtq_sink_pass.py

.PHONY: venv demo test lint docs diagrams check-diagrams conformance fuzz clean speedups asan

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(DOCS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[docs]'
	touch $@ $(DEMO)

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,lint,docs]'
	touch $@ $(DOCS) $(DEMO)

venv: $(DEV)

$(SPEEDUPS): vhsm/_speedups.c tools/build_speedups.py | $(BIN)/python
	$(BIN)/python tools/build_speedups.py

speedups: $(SPEEDUPS)

demo: $(DEMO) speedups
	$(BIN)/vhsm demo

test: venv speedups
	$(BIN)/python -m pytest -n 2 -q
	VHSM_PURE_PYTHON=1 $(BIN)/python -m pytest -n 2 -q $(DATA_PATH_TESTS)
	$(BIN)/mypy
	$(BIN)/ruff check vhsm tests benchmarks fuzz tools conformance hatch_build.py docs/hooks.py
	$(BIN)/ruff format --check vhsm tests benchmarks fuzz tools conformance hatch_build.py docs/hooks.py
	$(BIN)/mkdocs build --strict -q

# A copy of the package (symlinks, in a temporary directory) whose accelerator is built
# with -fsanitize=address and imported first (PYTHONPATH); libasan preloaded.
asan: venv
	set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	cp -rs $(CURDIR)/vhsm "$$dir/vhsm"; cp -r specs "$$dir/specs"; rm -f "$$dir"/vhsm/_speedups*.so; \
	$(BIN)/python tools/build_speedups.py --asan --strict --out "$$dir/vhsm"; \
	export LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
		PYTHONSAFEPATH=1 PYTHONPATH="$$dir"; \
	$(BIN)/python -c "import vhsm.speedups as s; assert s.accel and '$$dir' in s.accel.__file__"; \
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ASAN_TESTS)

docs: $(DOCS)
	$(BIN)/mkdocs build --strict

lint: venv
	$(BIN)/mypy
	$(BIN)/ruff check vhsm tests benchmarks fuzz tools conformance hatch_build.py docs/hooks.py

# The conformance matrix (docs/reference/conformance.md): vhsm audit against every
# vhost-user implementation this machine can start (QEMU, DPDK, virtiofsd: .ci/install-deps).
conformance: venv
	$(BIN)/python conformance/run.py --json conformance/reports.json

# The long attack (not part of `make test`): 10^6 fuzzed messages and 10^6 hostile rings,
# at low priority; each script prints what it tried, what did not end cleanly, fds and RSS.
FUZZ_MESSAGES ?= 1000000
FUZZ_RINGS ?= 1000000
fuzz: venv
	nice -n 10 $(BIN)/python fuzz/fuzz_messages.py --messages $(FUZZ_MESSAGES)
	nice -n 10 $(BIN)/python fuzz/fuzz_rings.py --rings $(FUZZ_RINGS)

diagrams: venv
	$(BIN)/vhsm diagram --format all --out diagrams
	$(BIN)/vhsm diagram --trace tests/data/qemu72-blk.jsonl --out diagrams
	$(BIN)/python tools/embed_diagrams.py

# Mermaid itself (mermaid-cli and Debian's chromium, headless) parses and draws every
# mermaid document vhsm writes or the docs show: a developer check, not part of `make test`
# (see docs/howto/contributing.md). The pictures land in build/diagrams-check/.
MERMAID_CLI_VERSION := 11.17.0
MMDC := .cache/mermaid-cli/node_modules/.bin/mmdc

$(MMDC):
	PUPPETEER_SKIP_DOWNLOAD=1 npm install --silent --no-audit --no-fund --prefix .cache/mermaid-cli \
		@mermaid-js/mermaid-cli@$(MERMAID_CLI_VERSION)

check-diagrams: venv $(MMDC)
	$(BIN)/python tools/check_diagrams.py --mmdc $(MMDC) --out build/diagrams-check

clean:
	rm -rf $(VENV) build dist site .pytest_cache .mypy_cache .ruff_cache vhsm/_speedups*.so
