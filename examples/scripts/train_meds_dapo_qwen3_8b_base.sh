#!/usr/bin/env bash
# DAPO + MEDS on Qwen3-8B-Base with the paper's settings (MEDS_SPEC.md §5), for OpenRLHF 0.11.2.
#
#   bash examples/scripts/train_meds_dapo_qwen3_8b_base.sh          # DAPO + MEDS (alpha 0.01)
#   MEDS=0 bash examples/scripts/train_meds_dapo_qwen3_8b_base.sh   # the DAPO baseline, everything else equal
#
# Submits to the Ray cluster at RAY_ADDRESS; extra arguments are appended to the trainer's flags. Every node of
# that cluster needs this package and its import hook installed (README), so that every process runs patched code.
set -euo pipefail

# ── This recipe ──
MODEL="${MODEL:-Qwen/Qwen3-8B-Base}"
# With long responses on Qwen3-8B the authors used a smaller alpha (0.005-0.02); 0.01 is the middle.
ALPHA="${ALPHA:-0.01}"
# Qwen3 base models: 1024 prompt + 7168 response tokens = 8192.
PROMPT_MAX_LEN="${PROMPT_MAX_LEN:-1024}"
RESPONSE_MAX_LEN="${RESPONSE_MAX_LEN:-7168}"
MICRO_ROLLOUT_BATCH_SIZE="${MICRO_ROLLOUT_BATCH_SIZE:-4}"
MICRO_TRAIN_BATCH_SIZE="${MICRO_TRAIN_BATCH_SIZE:-2}"
RUN_BASE="qwen3-8b-base-dapo"
ALGO_ARGS=(
    --algo.advantage.estimator group_norm
    --algo.dynamic_filtering_enable
    --algo.dynamic_filtering_range 0 1 # drop groups whose mean score is 0 or 1 (all wrong / all right)
    --actor.eps_clip_low_high 0.2 0.28
)

source "$(dirname "${BASH_SOURCE[0]}")/meds_recipe_common.sh" "$@"
