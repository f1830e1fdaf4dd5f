#!/usr/bin/env bash
# GRPO + MEDS on Qwen2.5-Math-7B with the paper's settings (MEDS_SPEC.md §5), for OpenRLHF 0.11.2.
#
#   bash examples/scripts/train_meds_grpo_qwen2.5_math_7b.sh          # GRPO + MEDS (alpha 0.1)
#   MEDS=0 bash examples/scripts/train_meds_grpo_qwen2.5_math_7b.sh   # the GRPO baseline, everything else equal
#
# Submits to the Ray cluster at RAY_ADDRESS; extra arguments are appended to the trainer's flags. Every node of
# that cluster needs this package and its import hook installed (README), so that every process runs patched code.
set -euo pipefail

# ── This recipe ──
MODEL="${MODEL:-Qwen/Qwen2.5-Math-7B}"
ALPHA="${ALPHA:-0.1}"
# Qwen2.5-Math-7B has a 4096-token context: 1024 prompt + 3072 response tokens fill it.
PROMPT_MAX_LEN="${PROMPT_MAX_LEN:-1024}"
RESPONSE_MAX_LEN="${RESPONSE_MAX_LEN:-3072}"
MICRO_ROLLOUT_BATCH_SIZE="${MICRO_ROLLOUT_BATCH_SIZE:-8}"
MICRO_TRAIN_BATCH_SIZE="${MICRO_TRAIN_BATCH_SIZE:-4}"
RUN_BASE="qwen2.5-math-7b-grpo"
# GRPO differs from the DAPO recipe only in having no dynamic filtering: all-right and all-wrong groups are kept
# and enter the MEDS memory (with MEDS an all-wrong group's advantages come from its penalties alone). §5 lists
# clip-higher among the shared settings; EPS_CLIP_HIGH=0.2 gives GRPO's symmetric clip.
ALGO_ARGS=(
    --algo.advantage.estimator group_norm
    --actor.eps_clip_low_high 0.2 "${EPS_CLIP_HIGH:-0.28}"
)

source "$(dirname "${BASH_SOURCE[0]}")/meds_recipe_common.sh" "$@"
