#!/usr/bin/env bash
# The whole GPU check of the CUDA kernels as ONE command, for a bare GPU machine lent for minutes (one
# H100 or H200 with a CUDA build of torch, nvcc, compute-sanitizer; no FAISS, no internet):
#
#   scripts/device_check.sh OUT_DIR                 # on the GPU machine, from anywhere in the repo
#   scripts/device_check.sh --dry-run OUT_DIR       # here, without a GPU: every step as far as it goes
#   scripts/device_check.sh --dry-run --no-build OUT_DIR   # the same with the metaclm_ext already importable
#
# Steps, each under its own timeout (and all under DEVICE_CHECK_BUDGET_S, default 450 s, so the whole
# run ends inside 8 minutes), each recorded whatever the others do:
#   env        what the machine is: GPU, driver, torch, nvcc, compute-sanitizer
#   build      the extension against this machine's torch, into build-device/ (the source tree's
#              metaclm_ext/ is left alone); sm_90 only (METACLM_CUDA_ARCHS), as both machines are Hopper
#   check      scripts/check_cuda_build.py: every operator has a CUDA kernel in the dispatcher
#   tests      pytest -m cuda: the reference tests on CUDA (bitwise = CPU op = reference on integer data),
#              opcheck, streaming, CUDA errors; not compute-sanitizer (its own steps) nor FAISS/gensim
#   bench      scripts/bench_cuda.py: limits, paper's shapes at 10^7 and 10^8 rows, streaming
#   memcheck   compute-sanitizer --tool=memcheck on scripts/cuda_sanitizer_case.py (each op, small)
#   racecheck  compute-sanitizer --tool=racecheck on the same case
# Outputs in OUT_DIR (five files): device_check.log (every step's output), summary.json (each step's
# status, seconds and last lines), check_cuda_build.json, pytest.xml, bench_cuda-*.json.
# The dry run builds with DEVICE_CHECK_PYTHON (default python3; a CPU torch builds the CPU extension, a
# CUDA torch the CUDA one, GPU or not), lets check_cuda_build accept a CPU torch, only collects the
# tests, runs the sanitizer case on the CPU (sanitizer-case) and the benchmark's --smoke.
# Exit status: 0 when every step that ran passed.
set -uo pipefail

usage() { echo "usage: $0 [--dry-run] [--no-build] OUT_DIR" >&2; exit 2; }

DRY_RUN=0
BUILD=1
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --no-build) BUILD=0 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${DEVICE_CHECK_PYTHON:-python3}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-450}"
BUILD_DIR="${DEVICE_CHECK_BUILD_DIR:-$REPO/build-device}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/device_check.log"
# The working directory of the steps: keeps pytest's and hypothesis' folders out of OUT_DIR (whose
# files come back from the GPU machine, a few at most), and the source tree's metaclm_ext off sys.path.
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/steps"
: >"$LOG"
DEADLINE=$(( $(date +%s) + BUDGET_S ))
export PY PYTHONUNBUFFERED=1 PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
FAILED=0

# summary.json from the steps so far (rewritten after each, so a run cut short still leaves one).
write_summary() {
  "$PY" - "$SCRATCH/steps" "$OUT/summary.json" "$DRY_RUN" <<'EOF_PY'
import json, os, sys
folder, out_path, dry_run = sys.argv[1:]
steps = []
for entry in sorted(os.listdir(folder)):
    if entry.endswith(".status"):
        name = entry[3:-len(".status")]
        status, seconds = open(os.path.join(folder, entry)).read().split()
        with open(os.path.join(folder, entry[:-len(".status")] + ".out"), errors="replace") as f:
            last = f.read().splitlines()[-15:]
        steps.append({"step": name, "status": status, "seconds": int(seconds), "last_lines": last})
summary = {"dry_run": dry_run == "1", "passed": all(s["status"] in ("passed", "skipped") for s in steps), "steps": steps}
with open(out_path, "w") as f:
    json.dump(summary, f, indent=2)
EOF_PY
}

# step NAME MAX_SECONDS COMMAND...: runs COMMAND (a program or an exported function) in $SCRATCH under
# min(MAX_SECONDS, time left in the budget); its output goes to the log, its status to summary.json.
STEP_NUMBER=0
step() {
  local name="$1" max_s="$2" left start status rc file
  shift 2
  STEP_NUMBER=$(( STEP_NUMBER + 1 ))
  file="$SCRATCH/steps/$(printf '%02d' "$STEP_NUMBER")-$name"
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, the budget of ${BUDGET_S}s is spent" | tee -a "$LOG" >"$file.out"
    echo "skipped 0" >"$file.status"
    write_summary
    return
  fi
  [ "$max_s" -le "$left" ] || max_s="$left"
  echo "== $name (timeout ${max_s}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  (cd "$SCRATCH" && timeout --kill-after=10 "$max_s" "$@") 2>&1 | tee -a "$LOG" >"$file.out"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) status=passed ;;
    124|137) status=timed_out ;;
    *) status="failed_rc_$rc" ;;
  esac
  [ "$rc" = 0 ] || FAILED=1
  echo "$status $(( $(date +%s) - start ))" >"$file.status"
  echo "== $name: $status after $(( $(date +%s) - start ))s" | tee -a "$LOG"
  write_summary
}

# shellcheck disable=SC2317  # run through `bash -c` (exported), under the step's timeout
machine_facts() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
    || echo "(no nvidia-smi)"
  "$PY" -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")
else:
    print("no CUDA device")'
  nvcc --version | tail -n 2 || echo "(no nvcc)"
  command -v compute-sanitizer ncu || echo "(compute-sanitizer or ncu missing)"
  echo "$(nproc) CPUs"
}

# The extension against this python's torch. Headers the toolkit may lack (cuBLAS and co., which torch's
# CUDA headers include) come from the nvidia-* wheels beside torch: CPATH ranks them after every -I
# path, so a complete toolkit's own headers win. setup.py runs from the repo root (relative sources).
# shellcheck disable=SC2317  # run through `bash -c` (exported), under the step's timeout
build_extension() {
  local wheel_headers
  wheel_headers="$("$PY" -c 'import os
try:
    import nvidia
    print(os.pathsep.join(os.path.join(p, "cu13", "include") for p in nvidia.__path__))
except ImportError:
    pass')"
  cd "$REPO" && CPATH="$wheel_headers${CPATH:+:$CPATH}" METACLM_CUDA_ARCHS="${METACLM_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py -q build --build-base "$BUILD_DIR" --build-lib "$BUILD_DIR/lib"
}
export REPO BUILD_DIR
export -f machine_facts build_extension

if [ "$BUILD" = 1 ]; then
  export PYTHONPATH="$BUILD_DIR/lib${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTEST=("$PY" -m pytest -p no:cacheprovider --benchmark-disable -q -rfEs -m cuda -k "not sanitizer"
        "$REPO/tests/test_cuda.py" "$REPO/tests/test_ops.py" "$REPO/tests/test_registration.py")
CASE="$REPO/scripts/cuda_sanitizer_case.py"

step env 30 bash -c machine_facts
[ "$BUILD" = 0 ] || step build 240 bash -c build_extension
if [ "$DRY_RUN" = 1 ]; then
  step check 60 "$PY" "$REPO/scripts/check_cuda_build.py" --allow-no-cuda --json "$OUT/check_cuda_build.json"
  step tests 120 "${PYTEST[@]}" --collect-only
  step sanitizer-case 60 "$PY" "$CASE" --check
  step bench 120 "$PY" "$REPO/scripts/bench_cuda.py" --smoke --out "$OUT"
else
  step check 60 "$PY" "$REPO/scripts/check_cuda_build.py" --json "$OUT/check_cuda_build.json"
  step tests 180 "${PYTEST[@]}" --junitxml "$OUT/pytest.xml"
  step bench 150 "$PY" "$REPO/scripts/bench_cuda.py" --out "$OUT"
  step memcheck 75 compute-sanitizer --tool=memcheck --error-exitcode=1 "$PY" "$CASE"
  step racecheck 90 compute-sanitizer --tool=racecheck --error-exitcode=1 "$PY" "$CASE"
fi

# The headline numbers on stdout too (the device tool returns its tail even when files do not come back).
"$PY" - "$OUT" <<'EOF_PY'
import glob, json, os, sys
out = sys.argv[1]
for s in json.load(open(os.path.join(out, "summary.json")))["steps"]:
    print(f"{s['step']:<15} {s['status']:<14} {s['seconds']:>4}s")
for path in glob.glob(os.path.join(out, "bench_cuda-*.json")):
    bench = json.load(open(path))
    print(bench["device"], {k: round(v, 1) for k, v in bench["limits"].items() if v is not None})
    for c in bench["cases"]:
        print(f"{c['name']:<10} N={c['N']:.0e} topk {c['topk_s'] * 1e3:9.2f} ms  torch {c['torch_matmul_topk_s'] * 1e3:9.2f} ms"
              f"  x{c['topk_speedup_over_torch']:.1f}  of limit {c['topk_fraction_of_limit']:.2f}"
              f"  of copy {c['topk_fraction_of_copy']:.2f}  of fp32 {c['topk_fraction_of_fp32']:.2f}")
    if bench.get("streaming"):
        print("streaming", {k: v for k, v in bench["streaming"].items() if k != "case"})
    for e in bench["errors"]:
        print("bench error:", e)
EOF_PY
echo "device_check: outputs in $OUT; $([ "$FAILED" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit "$FAILED"
