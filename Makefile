# The README's two commands: `make demo` (set up, build, run the main job) and `make test`.
# Both are idempotent: stamps under .make/ skip the steps whose inputs have not changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMPS := .make
SOURCES := setup.py pyproject.toml $(shell find csrc metaclm_ext -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: demo test install env bench clean

demo: install
	$(BIN)/metaclm demo

# pytest (not `python -m pytest`, which would put the source tree first on sys.path) so the tests import
# the installed package, as users do. Benchmarks run once each at a smoke size, so they cannot rot.
test: install
	$(BIN)/pytest -q -p no:cacheprovider --benchmark-disable tests benchmarks

# The benchmarks timed for real (METACLM_BENCH_ROWS sets the size); scripts/bench_table.py for the table.
bench: install
	$(BIN)/pytest -q -p no:cacheprovider benchmarks

env: $(STAMPS)/env
install: $(STAMPS)/install

$(STAMPS)/env: requirements.txt requirements-dev.txt
	@mkdir -p $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	@touch $@

# --no-build-isolation: build against the torch installed above (an isolated build would fetch a CUDA torch).
$(STAMPS)/install: $(STAMPS)/env $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation .
	@touch $@

clean:
	rm -rf build $(STAMPS) *.egg-info
