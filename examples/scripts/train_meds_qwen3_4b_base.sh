#!/usr/bin/env bash
# MEDS and its baselines on Qwen3-4B-Base, the authors' settings (meds_recipe_common.sh) on OpenRLHF 0.11.2:
#
#   bash examples/scripts/train_meds_qwen3_4b_base.sh                     # DAPO + MEDS, alpha 0.1
#   MEDS=0 bash examples/scripts/train_meds_qwen3_4b_base.sh              # the DAPO baseline
#   ALGO=grpo MEDS=0 bash examples/scripts/train_meds_qwen3_4b_base.sh    # the GRPO baseline
#   ALGO=grpo bash examples/scripts/train_meds_qwen3_4b_base.sh           # GRPO + MEDS
#
# Submits to the Ray cluster at RAY_ADDRESS; extra arguments are appended to the trainer's flags.
set -euo pipefail

MODEL="${MODEL:-Qwen/Qwen3-4B-Base}"
ALPHA="${ALPHA:-0.1}" # the paper's alpha for Qwen3-4B-Base (docs/ALGORITHM.md section 4)
# 1024 prompt + 7168 response tokens: the paper's Qwen3 length (docs/ALGORITHM.md section 5) and run_grpo.sh's.
PROMPT_MAX_LEN="${PROMPT_MAX_LEN:-1024}"
RESPONSE_MAX_LEN="${RESPONSE_MAX_LEN:-7168}"
MICRO_ROLLOUT_BATCH_SIZE="${MICRO_ROLLOUT_BATCH_SIZE:-4}"
MICRO_TRAIN_BATCH_SIZE="${MICRO_TRAIN_BATCH_SIZE:-2}"
RUN_BASE="qwen3-4b-base"

source "$(dirname "${BASH_SOURCE[0]}")/meds_recipe_common.sh" "$@"
