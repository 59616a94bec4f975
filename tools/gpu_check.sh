#!/usr/bin/env bash
# One prepared command that spends a lent GPU machine (the device tool, 15 minutes of device time in all,
# one command at most 10 minutes) in ONE call: environment, peer wheels, the CUDA build, the GPU tests and
# the logprobs + attention benchmarks, packed into $OUT. Run from the repository root.
#
#   bash tools/gpu_check.sh               # the full run: every step has a time limit, 540 s in all at most
#   bash tools/gpu_check.sh --quick       # everything shrunk (benchmarks --quick): 330 s at most; the CPU smoke
#   bash tools/gpu_check.sh --dry-run     # print the planned steps and their limits, run nothing
#   bash tools/gpu_check.sh --steps gpu-tests,pack   # only these steps (a rerun on a machine still warm)
#   bash tools/gpu_check.sh --prepare     # HERE, before the call: peer wheels into .whl/, commit into .whl/COMMIT
#
# The device call (after --prepare here, with the tree as it should be measured):
#   run(command="bash tools/gpu_check.sh", timeout_s=600, carry=[".whl"])
# It comes back with three files under files_at: summary.txt (the table below), gpu_check.log (every
# step's output) and results.tar.gz (results/bench/*.json|md|png, results/gpu-tests.xml, logs/*.log).
# Give the machine back at once (give_back) unless you rerun a step right away; a full rerun does not fit
# in 15 minutes of device time, a `--quick --steps ...` one may.
#
# Steps, each under its own `timeout` (a step that fails or times out does not stop the later ones):
#   env        nvidia-smi, python / torch / triton / transformers versions, the commit          -> logs/env.log
#   wheels     .whl/*.whl (if any) installed with pip --target $SCRATCH/site, then on PYTHONPATH
#   build      a CUDA torch and nvcc: QWENLONG_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-deps
#              --no-build-isolation -e . (the editable install is what makes qwenlong.kernels importable: when
#              the CUDA build fails or runs past the limit less BUILD_FALLBACK_RESERVE, the step installs
#              without the CUDA part, so the Triton tests and benchmarks still run, and says FAILED);
#              else (a CPU machine) the C++ part alone, built into the scratch folder, the tree untouched
#   gpu-tests  python3 -m pytest -m gpu on the test files that carry the marker, a per-test timeout; then the
#              Triton kernel test files' other tests, compiled for the GPU (8 processes)
#   tiles      tools/tile_sweep.py: the tile candidates the compile report left open, timed against the tables'
#   bench      python3 -m benchmarks --only logprobs, then --only attention, a process each (a crash or a CUDA
#              error in one leaves the other its results), --budget B between them: logprobs B/2, attention
#              what is left; B = the step's limit less a reserve for start-up and the row in flight; the limit
#              is what is left of the total
#   pack       results/ and logs/ as $OUT/results.tar.gz (plots dropped if it would pass 15 MiB)
# then a summary (step, limit, seconds, status) on stdout and in $OUT/summary.txt. Exit status 1 when a
# step failed or timed out. Without $OUT (a local run) the files go to a folder named on stdout.
#
# Environment: GPU_CHECK_SCRATCH (default: a fresh /tmp/gpu_check.XXXXXX; kept as it is when given, so
# a pack-only run can pack results made earlier), OUT.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

STEPS=(env wheels build gpu-tests tiles bench pack)
# seconds per step (bench: at most; it gets what is left of TOTAL_S before pack); quick | full
# (on the H200 machine, 2026-12-04: env 13 s, the build 61 s, the gpu-marked tests 18 s, the three kernel test
# files 35 s with -n 8 once compiled)
declare -A LIMIT_QUICK=([env]=20 [wheels]=30 [build]=120 [gpu-tests]=60 [tiles]=40 [bench]=200 [pack]=20)
declare -A LIMIT_FULL=([env]=20 [wheels]=45 [build]=150 [gpu-tests]=120 [tiles]=150 [bench]=480 [pack]=20)
TOTAL_QUICK=330 TOTAL_FULL=550     # the device command limit is 600 s: 550 + 7 x KILL_AFTER stays under it
# two benchmarks' start-up, the row in flight when the budget runs out (a FlexAttention compile: up to a
# minute) and the writing; a benchmark killed by the step's timeout writes no results files, but the rows
# it printed come back in $OUT/bench.log
BENCH_RESERVE_QUICK=30 BENCH_RESERVE_FULL=75
KILL_AFTER=5                       # SIGKILL this long after a step's SIGTERM
# the tiles step: start-up and the candidate in flight (a compile)
TILES_RESERVE_QUICK=10 TILES_RESERVE_FULL=30
# the build step: the install without the CUDA part, when the CUDA build fails or runs past its limit less this
BUILD_FALLBACK_RESERVE=30
PER_TEST_TIMEOUT=90                # pytest-timeout, seconds per GPU test
PACK_MAX_BYTES=$((15 * 1024 * 1024))  # the device returns files of at most 16 MiB
PEER_WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)  # what bench_logprobs compares against
# verl's fused log-probs + entropy kernel, run as verl ships it, without verl's package imports (ray, hydra,
# tensordict, ...): its kernel modules, device helpers and platform plugin, under empty package __init__ files
VERL_WHEEL=verl==0.9.1
VERL_KERNEL_FILES=('verl/utils/kernel/*' 'verl/utils/device.py' 'verl/plugin/*')

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

QUICK=0 DRY_RUN=0 PREPARE=0 SELECTED=("${STEPS[@]}")
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --prepare) PREPARE=1 ;;
    --steps)
      [ $# -ge 2 ] || die "--steps needs a comma-separated list of: ${STEPS[*]}"
      IFS=, read -r -a SELECTED <<<"$2"
      for step in "${SELECTED[@]}"; do
        [[ " ${STEPS[*]} " == *" $step "* ]] || die "--steps: unknown step '$step' (steps: ${STEPS[*]})"
      done
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  MODE=quick TOTAL_S=$TOTAL_QUICK BENCH_RESERVE=$BENCH_RESERVE_QUICK TILES_RESERVE=$TILES_RESERVE_QUICK
  declare -n LIMIT=LIMIT_QUICK
else
  MODE=full TOTAL_S=$TOTAL_FULL BENCH_RESERVE=$BENCH_RESERVE_FULL TILES_RESERVE=$TILES_RESERVE_FULL
  declare -n LIMIT=LIMIT_FULL
fi

# ----------------------------------------------------------------------------- --prepare (here, with network)
prepare() {
  # .whl/ travels with `carry`; it must stay out of git (the exclude file, not .gitignore)
  mkdir -p .git/info .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PEER_WHEELS[@]}" || return 1
  # the device's copy of the tree may have no .git: the env step reads the commit from here
  local download
  download=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$download" "$VERL_WHEEL" || return 1
  rm -rf .whl/verl-kernel && mkdir -p .whl/verl-kernel
  unzip -q -o "$download"/verl-*.whl "${VERL_KERNEL_FILES[@]}" -d .whl/verl-kernel || return 1
  : >.whl/verl-kernel/verl/__init__.py
  : >.whl/verl-kernel/verl/utils/__init__.py
  rm -rf "$download"
  echo "verl kernel ($VERL_WHEEL): $(find .whl/verl-kernel -name '*.py' | wc -l) files in .whl/verl-kernel"
  { git log -1 --format='%H %cI %s'; echo "uncommitted changes at --prepare:"; git status --short; } >.whl/COMMIT
  for wheel in .whl/*.whl; do
    echo "$(du -k "$wheel" | cut -f1) KiB  $wheel"
    unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'
  done
  echo "carried: $(du -sk .whl | cut -f1) KiB (the whole tree that travels must stay under 64 MiB)"
  echo 'now: run(command="bash tools/gpu_check.sh", timeout_s=600, carry=[".whl"])'
}
if [ "$PREPARE" = 1 ]; then
  prepare
  exit $?
fi

# ----------------------------------------------------------------------------- the plan
command_of() {  # the step's main command, for the plan and the logs
  case $1 in
    env) echo "nvidia-smi; python3 -c 'import torch, triton, transformers ...'; git log -1" ;;
    wheels) echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
                 "--target \$SCRATCH/site .whl/*.whl (skipped without .whl/*.whl)" ;;
    build) echo "QWENLONG_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install --no-deps" \
                "--no-build-isolation -e . (CPU: QWENLONG_BUILD_CUDA=0 setup.py build_ext into \$SCRATCH)" ;;
    gpu-tests) echo "python3 -m pytest -m gpu --timeout=$PER_TEST_TIMEOUT $(gpu_test_files | tr '\n' ' ');" \
                    "python3 -m pytest -m 'not gpu' -n 8 $(bash -c kernel_test_files) (the Triton kernels compiled for the GPU; where torch sees one)" ;;
    tiles) echo "python3 tools/tile_sweep.py --budget <limit - $TILES_RESERVE> (attention and LM-head tile candidates" \
                "against the tables'; a smoke run without a GPU)" ;;
    bench) echo "python3 -m benchmarks --only logprobs, then --only attention (a process each), --budget <limit -" \
                "$BENCH_RESERVE> between them $([ "$QUICK" = 1 ] && echo --quick)" ;;
    pack) echo "tar -czf \$OUT/results.tar.gz results logs" ;;
  esac
}

gpu_test_files() { grep -lE 'pytest\.mark\.gpu' tests/test_*.py; }
# kernel tests that run on the GPU when there is one (their `device` fixture), natively compiled there (TMA
# descriptors, wgmma): under the interpreter here they only check the semantics. A function, not an array:
# the steps run in `bash -c`, which sees exported functions but no arrays (an empty list ran the whole suite)
kernel_test_files() { echo tests/test_attention.py tests/test_logprobs.py tests/test_grpo_loss.py; }
export -f gpu_test_files kernel_test_files

worst_case_bench_limit() {  # the bench limit when every step before it spends its whole limit
  local before=0 step
  for step in "${STEPS[@]}"; do
    [ "$step" = bench ] && break
    before=$((before + LIMIT[$step]))
  done
  local left=$((TOTAL_S - before - LIMIT[pack]))
  left=$((left < 0 ? 0 : left))  # 0: the other steps' limits leave the benchmarks nothing
  echo $((left < LIMIT[bench] ? left : LIMIT[bench]))
}

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check plan ($MODE): total ${TOTAL_S} s, kill-after ${KILL_AFTER} s per step, device command limit 600 s"
  worst=0
  for step in "${SELECTED[@]}"; do
    limit=${LIMIT[$step]}
    [ "$step" = bench ] && limit=$(worst_case_bench_limit)
    worst=$((worst + limit + KILL_AFTER))
    printf 'step %-9s limit %3d s  %s\n' "$step" "$limit" "$(command_of "$step")"
  done
  echo "worst case: $worst s (bench at its smallest: it gets what is left of ${TOTAL_S} s, at most ${LIMIT[bench]} s)"
  echo "files back: results.tar.gz summary.txt gpu_check.log gpu-tests.log tiles.log bench.log (the device takes at most 8)"
  exit 0
fi

# ----------------------------------------------------------------------------- scratch, $OUT, logs
unset TRITON_INTERPRET QWENLONG_BACKEND  # real kernels on a GPU; the benchmarks pick their CPU paths themselves
SCRATCH=${GPU_CHECK_SCRATCH:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
RESULTS=$SCRATCH/results LOGS=$SCRATCH/logs SITE=$SCRATCH/site
PEERS_PATH=$SITE:$ROOT/.whl/verl-kernel  # the peer wheels' install and verl's kernel files
mkdir -p "$RESULTS" "$LOGS" || exit 1
if [ -n "${OUT:-}" ]; then
  OUT_DIR=$OUT
else
  OUT_DIR=$SCRATCH/out
  echo "gpu_check: OUT is not set (a local run): the files to bring back go to $OUT_DIR"
fi
mkdir -p "$OUT_DIR" || exit 1
MAIN_LOG=$LOGS/gpu_check.log
export ROOT MODE QUICK BENCH_RESERVE TILES_RESERVE BUILD_FALLBACK_RESERVE SCRATCH RESULTS LOGS SITE PEERS_PATH PER_TEST_TIMEOUT PACK_MAX_BYTES OUT_DIR PYTHONUNBUFFERED=1

say() { echo "[gpu_check $((SECONDS))s] $*" | tee -a "$MAIN_LOG"; }
note() { echo "NOTE: $*"; }  # a step's one-line status detail for the summary (its last NOTE line counts)

# ----------------------------------------------------------------------------- the steps (run as bash -c)
step_env() {
  echo "date: $(date -u +%FT%TZ)  host: $(uname -n)  cpus: $(nproc)  mode: $MODE"
  free -g 2>/dev/null | head -2
  df -h "$ROOT" /tmp | tail -n +2
  if [ -e "$ROOT/.git" ]; then  # the device's copy of the tree may have none: then the one --prepare wrote
    commit=$(git -C "$ROOT" log -1 --format='%H %cI %s')
  else
    commit=$(head -1 "$ROOT/.whl/COMMIT" 2>/dev/null || echo "unknown (no .git, no .whl/COMMIT)")
  fi
  echo "commit: $commit"
  [ -f "$ROOT/.whl/COMMIT" ] && sed -n '2,$p' "$ROOT/.whl/COMMIT"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "nvidia-smi: not found (no GPU here)"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  python3 - <<'EOF'
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else "n/a")
for name in ("triton", "transformers", "numpy", "setuptools", "pybind11", "ninja", "pytest", "pytest_timeout"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError as error:
        print(f"{name}: not importable ({error})")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.1f} GiB")
EOF
  python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" |
    sed 's/^/NOTE: /'
}

step_wheels() {
  ls -l "$ROOT"/.whl/*.whl
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" \
    "$ROOT"/.whl/*.whl || return 1
  # the modules bench_logprobs imports; a failure here is reported, the benchmark says "not available"
  # one process for all (a python3 that imports torch and triton took ~7 s there: one each ran past 30 s)
  PYTHONPATH=$PEERS_PATH${PYTHONPATH:+:$PYTHONPATH} python3 - <<'EOF'
import importlib

for module in ("liger_kernel.transformers", "liger_kernel.chunked_loss", "cut_cross_entropy",
               "verl.utils.kernel.linear_cross_entropy"):
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as error:  # noqa: BLE001  (reported; the benchmark says "not available")
        print(f"import {module}: FAILED: {type(error).__name__}: {error}")
EOF
  note "$(ls "$SITE" | grep -c '\.dist-info$') wheels: $(ls "$SITE" | sed -n 's/\.dist-info$//p' | tr '\n' ' ')"
}

step_build() {
  local torch_cuda
  torch_cuda=$(python3 -c "import torch; print(torch.version.cuda or '')")
  if [ -n "$torch_cuda" ] && command -v nvcc >/dev/null; then
    # shellcheck source=tools/cuda_env.sh
    source "$ROOT/tools/cuda_env.sh"
    CUDA_HOME=$(find_cuda_home) || { echo "no CUDA toolkit with libcudart.so for nvcc: set CUDA_HOME"; return 1; }
    export CUDA_HOME QWENLONG_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
    CPATH=$(cpath_with_torch_cuda_headers "$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")")
    export CPATH
    echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS torch CUDA $torch_cuda"
    # --no-index and no version check: nothing can be reached from the machine, so pip must not try
    local install=(python3 -m pip install --disable-pip-version-check --no-index --no-deps --no-build-isolation
                   --no-cache-dir -e "$ROOT")
    # the editable install is what makes qwenlong.kernels importable: a CUDA build that fails or runs long must
    # not take the Triton tests and benchmarks down with it, so it gets what is left less the reserve in which
    # the install without the CUDA part (the C++ host part, ~15 s) runs instead
    local cuda_limit=$((STEP_LIMIT - SECONDS - BUILD_FALLBACK_RESERVE)) rc=0
    cuda_limit=$((cuda_limit < 1 ? 1 : cuda_limit))  # (timeout 0 would mean no limit)
    timeout --kill-after=5 "$cuda_limit" "${install[@]}" || rc=$?
    if [ "$rc" != 0 ]; then
      echo "the CUDA build failed (rc=$rc$([ "$rc" = 124 ] && echo ": past its $cuda_limit s")): installing without" \
           "the CUDA part, so that qwenlong.kernels (the Triton kernels) still imports for the tests and benchmarks"
      if QWENLONG_BUILD_CUDA=0 "${install[@]}" && python3 -c "import qwenlong.kernels"; then
        note "CUDA build FAILED (rc=$rc): installed without the CUDA part (Triton kernels only)"
      else
        note "CUDA build FAILED (rc=$rc), and the install without the CUDA part too: qwenlong.kernels missing"
      fi
      return 1
    fi
    python3 - <<'EOF' || return 1
from qwenlong import _C

assert _C.host is not None, _C.host_error
assert _C.cuda is not None, _C.cuda_error
print("qwenlong._C._cuda:", _C.cuda.__file__)
import qwenlong.kernels  # noqa: E402,F401  (the editable install maps kernels/ to qwenlong.kernels)
EOF
    command -v cuobjdump >/dev/null && cuobjdump --list-elf "$ROOT"/qwenlong/_C/_cuda*.so | head -5
    note "qwenlong._C._cuda built for sm_90 (torch CUDA $torch_cuda)"
  else
    echo "CUDA part skipped: $([ -z "$torch_cuda" ] && echo "torch is a CPU build" || echo "no nvcc on PATH")"
    echo "(with a CUDA torch and nvcc this step runs: $(command_of build | sed 's/ (CPU:.*//'))"
    # the tree's own extension stays as it is (other processes may have it loaded): build beside it
    QWENLONG_BUILD_CUDA=0 python3 setup.py -q build_ext --build-lib "$SCRATCH/build/lib" \
      --build-temp "$SCRATCH/build/tmp" || return 1
    ls "$SCRATCH"/build/lib/qwenlong/_C/_host*.so || return 1
    note "C++ part only (no CUDA torch / nvcc): built into $SCRATCH/build"
  fi
}

step_gpu_tests() {
  local files kernel_files timeout_flag=() parallel=() rc kernel_rc
  mapfile -t files < <(gpu_test_files)
  read -r -a kernel_files <<<"$(kernel_test_files)"
  python3 -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout="$PER_TEST_TIMEOUT")
  python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)  # Triton compiles one kernel per process at a time
  # one process (-p no:xdist: tests/conftest.py would spread a plain pytest over the cores where xdist is installed)
  python3 -m pytest -m gpu -q -rs -p no:xdist "${timeout_flag[@]}" --junitxml="$RESULTS/gpu-tests.xml" "${files[@]}" 2>&1 |
    tee "$SCRATCH/pytest.out"
  rc=${PIPESTATUS[0]}
  if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    # -v: a line per test as it ends, so that a step cut by its limit still says which ran and how
    # -m "not gpu": the gpu-marked ones of these files ran just above
    python3 -m pytest -v -rfEs -m "not gpu" "${parallel[@]}" "${timeout_flag[@]}" --junitxml="$RESULTS/kernel-tests.xml" \
      "${kernel_files[@]}" 2>&1 | tee "$SCRATCH/kernel-pytest.out"
    kernel_rc=${PIPESTATUS[0]}
  else  # the interpreter would take minutes here, and the README's test command runs these files anyway
    echo "0 skipped (no GPU: the kernel tests run natively on a GPU only)" > "$SCRATCH/kernel-pytest.out"
    kernel_rc=0
  fi
  note "gpu-marked: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$SCRATCH/pytest.out" | tail -1 | tr -d '=' |
    xargs); kernels: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$SCRATCH/kernel-pytest.out" | tail -1 |
    tr -d '=' | xargs)"
  [ "$rc" = 0 ] && rc=$kernel_rc
  return "$rc"
}

step_bench() {
  # one process per benchmark: a crash, a hang or a CUDA error that poisons the context (an illegal address, a
  # device-side assert: every later op of the process fails) in one leaves the other its rows and results files.
  # logprobs: half the budget, and a limit of that and half the reserve (its last row, start-up, writing);
  # attention: what is left of the budget, and of the step's limit less a little, so that its own limit ends it
  local quick=() rc=0 name budget limit status begin=$SECONDS started
  [ "$QUICK" = 1 ] && quick=(--quick)
  : >"$SCRATCH/bench.out"
  for name in logprobs attention; do
    if [ "$name" = logprobs ]; then
      budget=$((BENCH_BUDGET / 2)) limit=$((BENCH_BUDGET / 2 + BENCH_RESERVE / 2))
    else
      budget=$((BENCH_BUDGET - (SECONDS - begin))) limit=$((STEP_LIMIT - SECONDS - 3))
    fi
    budget=$((budget < 1 ? 1 : budget)) limit=$((limit < 1 ? 1 : limit)) started=$SECONDS
    timeout --kill-after=5 "$limit" python3 -m benchmarks --only "$name" --out "$RESULTS/bench" --budget "$budget" \
      "${quick[@]}" 2>&1 | tee -a "$SCRATCH/bench.out"
    status=${PIPESTATUS[0]}
    if [ "$status" != 0 ]; then
      rc=$status
      # a process killed or crashed says nothing: say it here, in the form the note reads
      grep -qE "^=== $name: (done|FAILED) in" "$SCRATCH/bench.out" ||
        echo "=== $name: FAILED in $((SECONDS - started)) s (the process ended with rc=$status$(
          [ "$status" = 124 ] || [ "$status" = 137 ] && echo ": past its limit of $limit s"))" |
          tee -a "$SCRATCH/bench.out"
    fi
  done
  note "budget ${BENCH_BUDGET} s: $(sed -n 's/^=== \(.*\): \(done\|FAILED\) in \(.*\)$/\1 \2 \3/p' "$SCRATCH/bench.out" |
    paste -sd ';' | sed 's/;/; /g')"
  return "$rc"
}

step_tiles() {
  local smoke=()
  python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" ||
    smoke=(--smoke --limit 1)  # the interpreter: plumbing only
  python3 tools/tile_sweep.py --out "$RESULTS/tiles" --budget "$TILES_BUDGET" "${smoke[@]}" || return 1
  note "$(python3 -c "import json, sys
rows = [row for sweep in json.load(open(sys.argv[1]))['sweeps'].values() for row in sweep['rows']]
print(sum(row['status'] == 'ok' for row in rows), 'of', len(rows), 'configs timed')" "$RESULTS/tiles/tile-sweep.json")"
}

step_pack() {
  local archive=$OUT_DIR/results.tar.gz
  tar -czf "$archive" -C "$SCRATCH" results logs || return 1
  if [ "$(stat -c %s "$archive")" -gt "$PACK_MAX_BYTES" ]; then
    echo "results.tar.gz passes $PACK_MAX_BYTES bytes: packing again without the plots"
    tar -czf "$archive" --exclude='*.png' -C "$SCRATCH" results logs || return 1
  fi
  local bytes files
  bytes=$(stat -c %s "$archive")
  files=$(tar -tzf "$archive" | grep -vc '/$')
  tar -tzf "$archive"
  [ "$bytes" -le "$PACK_MAX_BYTES" ] || { echo "results.tar.gz is still $bytes bytes"; rm -f "$archive"; return 1; }
  note "results.tar.gz $((bytes / 1024)) KiB, $files files"
}

export -f note command_of step_env step_wheels step_build step_gpu_tests step_tiles step_bench step_pack

# ----------------------------------------------------------------------------- running them
declare -A STATUS SPENT USED_LIMIT NOTE
LIVE_STEPS=" gpu-tests tiles bench "  # their output is also written to $OUT/<step>.log as it comes
run_step() {  # name limit: runs step_<name> under timeout, output to logs/<name>.log and the main log
  local name=$1 limit=$2 log=$LOGS/$1.log begin=$SECONDS rc live=/dev/null
  [[ $LIVE_STEPS == *" $name "* ]] && live=$OUT_DIR/$name.log
  say "=== $name: limit ${limit} s, log $log"
  echo "\$ $(command_of "$name")" >"$log"
  STEP_LIMIT=$limit timeout --kill-after="$KILL_AFTER" "$limit" bash -c "step_${name//-/_}" 2>&1 </dev/null |
    tee -a "$log" >"$live"
  rc=${PIPESTATUS[0]}
  SPENT[$name]=$((SECONDS - begin)) USED_LIMIT[$name]=$limit
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="TIMEOUT" ;;
    *) STATUS[$name]="FAILED rc=$rc" ;;
  esac
  NOTE[$name]=$(sed -n 's/^NOTE: //p' "$log" | tail -1)
  cat "$log" >>"$MAIN_LOG"
  tail -n 15 "$log"
  say "=== $name: ${STATUS[$name]} in ${SPENT[$name]} s"
  tail -c "$PACK_MAX_BYTES" "$MAIN_LOG" >"$OUT_DIR/gpu_check.log"  # what is done so far comes back, whatever follows
}

skip_step() {
  STATUS[$1]="skipped" SPENT[$1]=0 USED_LIMIT[$1]=0 NOTE[$1]=$2
  say "=== $1: skipped ($2)"
}

selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

say "gpu_check ($MODE) in $ROOT, scratch $SCRATCH, steps: ${SELECTED[*]}"
for step in "${STEPS[@]}"; do
  selected "$step" || continue
  case $step in
    wheels)
      if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        skip_step wheels "no .whl/*.whl (see --prepare)"
        continue
      fi
      run_step wheels "${LIMIT[wheels]}"
      # installed is enough (a step cut during its import checks left the benchmarks without their peers)
      if compgen -G "$SITE/*.dist-info" >/dev/null; then
        export PYTHONPATH=$PEERS_PATH${PYTHONPATH:+:$PYTHONPATH}
      fi ;;
    bench)
      left=$((TOTAL_S - SECONDS - LIMIT[pack]))
      limit=$((left < LIMIT[bench] ? left : LIMIT[bench]))
      if [ "$limit" -lt $((BENCH_RESERVE + 10)) ]; then
        skip_step bench "only ${left} s left of ${TOTAL_S} s"
        continue
      fi
      export BENCH_BUDGET=$((limit - BENCH_RESERVE))
      run_step bench "$limit" ;;
    tiles)
      export TILES_BUDGET=$((LIMIT[tiles] - TILES_RESERVE))
      run_step tiles "${LIMIT[tiles]}" ;;
    *) run_step "$step" "${LIMIT[$step]}" ;;
  esac
done

# ----------------------------------------------------------------------------- the summary
summary() {
  local step failed=0
  echo "== gpu_check summary: $MODE on ${NOTE[env]:-?}, $((SECONDS)) s of ${TOTAL_S} s"
  printf '%-10s %7s %7s  %-10s %s\n' step limit_s seconds status note
  for step in "${STEPS[@]}"; do
    selected "$step" || continue
    printf '%-10s %7s %7s  %-10s %s\n' "$step" "${USED_LIMIT[$step]}" "${SPENT[$step]}" "${STATUS[$step]}" \
      "$(echo "${NOTE[$step]}" | cut -c1-120)"
    case ${STATUS[$step]} in ok|skipped) ;; *) failed=1 ;; esac
  done
  echo "files: $OUT_DIR ($(ls "$OUT_DIR" | tr '\n' ' '))"
  return $failed
}
touch "$OUT_DIR/summary.txt" "$OUT_DIR/gpu_check.log"  # listed by the summary itself
summary >"$OUT_DIR/summary.txt"
failed=$?
cat "$OUT_DIR/summary.txt" | tee -a "$MAIN_LOG"
tail -c "$PACK_MAX_BYTES" "$MAIN_LOG" >"$OUT_DIR/gpu_check.log"
exit "$failed"
