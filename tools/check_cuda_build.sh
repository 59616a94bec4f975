#!/usr/bin/env bash
# Compiles qwenlong's CUDA extension (qwenlong._C._cuda) against a CUDA build of torch and
# checks that the wheel ships it. No GPU needed: only nvcc and the CUDA torch wheel.
#
#   tools/check_cuda_build.sh [VENV]
#
# VENV (default $QWENLONG_CUDA_VENV, else /tmp/qwenlong-cuda-venv) is reused when it already
# holds torch==$TORCH_VERSION built for CUDA, else created/filled with torch, pybind11,
# setuptools, wheel, ninja and numpy. The build runs on a copy of the source tree, so the
# checkout's in-place extensions and build/ stay untouched.
#
# Filling the venv needs about NEEDED_GB (6) GiB of free disk; with less, the check says SKIPPED
# and exits 0, or 1 when QWENLONG_REQUIRE_CUDA_BUILD=1.
#
# Environment: TORCH_VERSION (2.14.1), TORCH_CUDA_ARCH_LIST ("8.0;9.0"), MAX_JOBS (2),
# WHEEL_DIR (a fresh temporary folder); CPATH is extended with the CUDA headers that ship
# inside the torch wheels (nvidia/*/include: cuBLAS and friends, which a bare toolkit lacks).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-${QWENLONG_CUDA_VENV:-/tmp/qwenlong-cuda-venv}}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
NEEDED_GB=${NEEDED_GB:-6}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
WHEEL_DIR=${WHEEL_DIR:-$(mktemp -d /tmp/qwenlong-cuda-wheel.XXXXXX)}
start=$SECONDS
say() { echo "[check_cuda_build $((SECONDS - start))s] $*"; }
fail() { echo "[check_cuda_build] FAILED: $*" >&2; exit 1; }

# shellcheck source=tools/cuda_env.sh
source "$ROOT/tools/cuda_env.sh"
CUDA_HOME=$(find_cuda_home) || fail "nvcc is not on PATH and CUDA_HOME is not set, or its toolkit has no libcudart.so"
[ -x "${CUDA_HOME:-}/bin/nvcc" ] || fail "no CUDA toolkit with bin/nvcc and libcudart.so found: set CUDA_HOME"
export CUDA_HOME
say "CUDA_HOME=$CUDA_HOME, $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
# prints "torch <version> CUDA <version>" when the venv is ready, fails otherwise
describe_venv() {
  "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys

import ninja, numpy, pybind11, setuptools, torch, wheel  # noqa: F401

if torch.__version__.split("+")[0] != sys.argv[1] or not torch.version.cuda:
    sys.exit(1)
print("torch", torch.__version__, "CUDA", torch.version.cuda)
EOF
}
if ! description=$(describe_venv); then
  available=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$available" -lt "$NEEDED_GB" ]; then
    echo "[check_cuda_build] SKIPPED: $available GiB free next to $VENV; the CUDA build of torch needs $NEEDED_GB GiB." >&2
    [ "${QWENLONG_REQUIRE_CUDA_BUILD:-0}" = 1 ] && exit 1
    exit 0
  fi
  say "installing torch==$TORCH_VERSION (without triton) pybind11 setuptools wheel ninja numpy into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION"
  # torch's own requirements but triton (0.9 GB that the build never imports); what the CUDA
  # libraries need stays, since importing a CUDA build of torch loads them all
  mapfile -t requirements < <("$VENV/bin/python" -c "from importlib.metadata import requires
print('\\n'.join(r for r in requires('torch') if not r.startswith('triton')))")
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-warn-conflicts "${requirements[@]}" \
    pybind11 setuptools wheel ninja numpy
  description=$(describe_venv) || fail "torch in $VENV is not a CUDA build of $TORCH_VERSION"
fi
say "$description"

SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CPATH=$(cpath_with_torch_cuda_headers "$SITE")
export CPATH

SRC=$(mktemp -d /tmp/qwenlong-cuda-src.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
tar -C "$ROOT" --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' \
  --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -

say "building the wheel (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) into $WHEEL_DIR"
QWENLONG_BUILD_CUDA=1 "$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$WHEEL_DIR" "$SRC"

wheel=$(ls -t "$WHEEL_DIR"/qwenlong-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || fail "no qwenlong wheel in $WHEEL_DIR"
"$VENV/bin/python" -m zipfile -l "$wheel" | grep -E 'qwenlong/_C/_cuda[^/]*\.so' ||
  fail "$wheel has no qwenlong/_C/_cuda*.so"
"$VENV/bin/python" -m zipfile -l "$wheel" | grep -E 'qwenlong/_C/_host[^/]*\.so' ||
  fail "$wheel has no qwenlong/_C/_host*.so"
say "OK: $wheel"
