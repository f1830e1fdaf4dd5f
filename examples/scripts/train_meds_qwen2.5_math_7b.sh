#!/usr/bin/env bash
# MEDS and its baselines on Qwen2.5-Math-7B, the authors' settings (meds_recipe_common.sh) on OpenRLHF 0.11.2:
#
#   bash examples/scripts/train_meds_qwen2.5_math_7b.sh                   # DAPO + MEDS, alpha 0.1 (run_meds.sh)
#   MEDS=0 bash examples/scripts/train_meds_qwen2.5_math_7b.sh            # the DAPO baseline (run_dapo.sh)
#   ALGO=grpo MEDS=0 bash examples/scripts/train_meds_qwen2.5_math_7b.sh  # the GRPO baseline (run_grpo.sh)
#   ALGO=grpo bash examples/scripts/train_meds_qwen2.5_math_7b.sh         # GRPO + MEDS
#   ALGO=grpo_entropy_adv MEDS=0 bash examples/scripts/train_meds_qwen2.5_math_7b.sh
#                                             # the entropy-advantage baseline (run_grpo_entropy_adv.sh)
#
# Submits to the Ray cluster at RAY_ADDRESS; extra arguments are appended to the trainer's flags. Every node of
# that cluster needs this package and its import hook installed (README), so that every process runs patched code.
set -euo pipefail

MODEL="${MODEL:-Qwen/Qwen2.5-Math-7B}"
ALPHA="${ALPHA:-0.1}" # run_meds.sh: penalty_coef=0.1
# The model's context is 4096 tokens: max_prompt_length=1024 + max_response_length=3072 (run_meds.sh) fill it.
# run_grpo.sh asks for 7168 response tokens, which veRL refuses for this model (vllm_rollout_spmd.py asserts
# prompt + response <= max_position_embeddings), so both arms use 3072 here.
PROMPT_MAX_LEN="${PROMPT_MAX_LEN:-1024}"
RESPONSE_MAX_LEN="${RESPONSE_MAX_LEN:-3072}"
MICRO_ROLLOUT_BATCH_SIZE="${MICRO_ROLLOUT_BATCH_SIZE:-8}"
MICRO_TRAIN_BATCH_SIZE="${MICRO_TRAIN_BATCH_SIZE:-4}"
RUN_BASE="qwen2.5-math-7b"

source "$(dirname "${BASH_SOURCE[0]}")/meds_recipe_common.sh" "$@"
