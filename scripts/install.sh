#!/usr/bin/env bash
# Install openrlhf-meds with everything its tests need into ./.venv, on a CPU-only machine.
# On a GPU cluster use the README's GPU install instead (real flash-attn and vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
# torch first: openrlhf asks for an unpinned torch, which would otherwise pull a multi-GB CUDA build.
pip install -q torch==2.13.0 numpy packaging setuptools wheel
# flash-attn has no CPU wheel: install its Python files only (openrlhf imports it at module level).
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  pip install -q --no-build-isolation --no-deps flash-attn==2.8.3
pip install -q -e ".[test]"
python -m meds_patch install-hook
