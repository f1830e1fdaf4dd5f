#!/usr/bin/env bash
# What every MEDS recipe shares: sourced by examples/scripts/train_meds_*.sh after they set MODEL, ALPHA,
# PROMPT_MAX_LEN, RESPONSE_MAX_LEN, the micro-batch sizes, RUN_BASE and ALGO_ARGS. Arguments are the recipe's.

# ── Switches, paths, cluster shape ──
MEDS="${MEDS:-1}"
case "$MEDS" in 0 | 1) ;; *) echo "MEDS must be 0 or 1, got '$MEDS'" >&2 && exit 2 ;; esac
RUN_NAME="${RUN_NAME:-$RUN_BASE$([[ $MEDS == 1 ]] && echo -meds || true)}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# One JSON row per question: the bare question and its reference answer (DAPO-Math-17K + MATH levels 3-5,
# deduplicated). The Qwen-Math instruction comes from PROMPT_TEMPLATE below, so it must not be in the data.
DATASET="${DATASET:-$HOME/data/dapo17k_math_l3to5.jsonl}"
INPUT_KEY="${INPUT_KEY:-problem}"
LABEL_KEY="${LABEL_KEY:-answer}"
# Baseline and MEDS runs get separate directories: --ckpt.load_enable must never resume the other one.
SAVE_DIR="${SAVE_DIR:-$HOME/checkpoints/meds/$RUN_NAME}"
SAVE_STEPS="${SAVE_STEPS:-20}"
NUM_EPISODES="${NUM_EPISODES:-10}"
NUM_NODES="${NUM_NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
VLLM_TP="${VLLM_TP:-1}"
VLLM_GPU_MEMORY="${VLLM_GPU_MEMORY:-0.6}"
MEDS_NUM_WORKERS="${MEDS_NUM_WORKERS:-0}"

# ── Paper settings (MEDS_SPEC.md §5) ──
ROLLOUT_BATCH_SIZE=512 # prompts per step
N_SAMPLES=16           # rollouts per prompt
# Not in §5: DAPO's public recipe updates on mini-batches of 32 prompts x 16 rollouts (16 optimizer steps per
# RL step); TRAIN_BATCH_SIZE=8192 makes it one update per step.
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-512}"
# 0.11.2 has no prompt-length flag: prompts are cut to data.max_len - rollout.max_new_tokens tokens (the end is
# kept), and the DAPO overlong buffer counts back from rollout.max_new_tokens.
MAX_LEN=$((PROMPT_MAX_LEN + RESPONSE_MAX_LEN))
# 10 warm-up steps. 0.11.2 takes a warm-up *ratio* of a horizon that uses every prompt once per episode,
# N * 16 / TRAIN_BATCH_SIZE * episodes optimizer steps, so 10 steps of 512 prompts is 10 * 512 / (N * episodes)
# for any TRAIN_BATCH_SIZE. N: the lines of a local JSONL dataset, else NUM_PROMPTS (default: an estimate, 23k).
WARMUP_STEPS=10
if [[ -z "${NUM_PROMPTS:-}" ]]; then
    if [[ -f "$DATASET" ]]; then NUM_PROMPTS=$(wc -l <"$DATASET"); else NUM_PROMPTS=23000; fi
fi
WARMUP_RATIO="${WARMUP_RATIO:-$(awk -v s="$WARMUP_STEPS" -v b="$ROLLOUT_BATCH_SIZE" -v n="$NUM_PROMPTS" \
    -v e="$NUM_EPISODES" 'BEGIN { r = s * b / (n * e); printf "%.6f", (r < 1 ? r : 1) }')}"
# The Qwen-Math prompt. The template goes through str.format, so its literal \boxed{} is written \boxed{{}}.
PROMPT_TEMPLATE=$'<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n'
PROMPT_TEMPLATE="${INPUT_TEMPLATE:-$PROMPT_TEMPLATE}"

MEDS_ARGS=()
if [[ $MEDS == 1 ]]; then
    # Reference MEDS: wrong rollouts penalised, beta = 2 * alpha (its default), K = 14 layers. The error memory
    # lives in the driver; MEDS_NUM_WORKERS > 0 spreads it over that many Ray CPU actors (identical results).
    MEDS_ARGS=(--meds --algo.meds.alpha "$ALPHA" --algo.meds.num_layers 14 --algo.meds.target wrong
        --algo.meds.num_workers "$MEDS_NUM_WORKERS")
fi
LOG_ARGS=(--logger.tensorboard_dir "$SAVE_DIR/tensorboard" --logger.wandb.run_name "$RUN_NAME")
if [[ -n "${WANDB_API_KEY:-}" ]]; then
    LOG_ARGS+=(--logger.wandb.key "$WANDB_API_KEY" --logger.wandb.project "${WANDB_PROJECT:-meds}")
fi

# Hybrid engine: actor and vLLM engines share every GPU and sleep in turn; no reference model (no KL).
# lr stays constant after the warm-up, as in DAPO's recipe (0.11.2's default decays it). --ckpt.load_enable
# resumes from $SAVE_DIR/ckpt (MEDS error memory included) when it exists, and starts fresh otherwise.
ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --runtime-env-json="{\"working_dir\": \"$REPO_DIR\"}" \
    -- python3 -m openrlhf.cli.train_ppo_ray \
    --actor.model_name_or_path "$MODEL" \
    --reward.remote_url examples/reward_func_math.py \
    --data.prompt_dataset "$DATASET" \
    --data.input_key "$INPUT_KEY" \
    --data.label_key "$LABEL_KEY" \
    --data.input_template "$PROMPT_TEMPLATE" \
    --data.max_len "$MAX_LEN" \
    --rollout.max_new_tokens "$RESPONSE_MAX_LEN" \
    --actor.num_nodes "$NUM_NODES" \
    --actor.num_gpus_per_node "$GPUS_PER_NODE" \
    --vllm.num_engines $((NUM_NODES * GPUS_PER_NODE / VLLM_TP)) \
    --vllm.tensor_parallel_size "$VLLM_TP" \
    --vllm.gpu_memory_utilization "$VLLM_GPU_MEMORY" \
    --vllm.enable_prefix_caching \
    --vllm.sync_backend nccl \
    --train.colocate_all \
    --vllm.enable_sleep \
    --ds.enable_sleep \
    --ds.zero_stage 3 \
    --ds.param_dtype bf16 \
    --ds.packing_samples \
    --actor.gradient_checkpointing_enable \
    "${ALGO_ARGS[@]}" \
    --algo.kl.init_coef 0 \
    --actor.loss_agg_mode token-mean \
    --reward.overlong_buffer_len 512 \
    --reward.overlong_penalty_factor 1.0 \
    --rollout.temperature 1.0 \
    --rollout.top_p 1.0 \
    --rollout.batch_size "$ROLLOUT_BATCH_SIZE" \
    --rollout.n_samples_per_prompt "$N_SAMPLES" \
    --rollout.micro_batch_size "$MICRO_ROLLOUT_BATCH_SIZE" \
    --train.batch_size "$TRAIN_BATCH_SIZE" \
    --train.micro_batch_size "$MICRO_TRAIN_BATCH_SIZE" \
    --train.max_epochs 1 \
    --train.num_episodes "$NUM_EPISODES" \
    --actor.adam.lr 1e-6 \
    --actor.adam.weight_decay 0.1 \
    --actor.lr_scheduler constant_with_warmup \
    --actor.lr_warmup_ratio "$WARMUP_RATIO" \
    --actor.max_norm 1.0 \
    --ckpt.output_dir "$SAVE_DIR" \
    --ckpt.path "$SAVE_DIR/ckpt" \
    --ckpt.save_steps "$SAVE_STEPS" \
    --ckpt.save_hf \
    --ckpt.load_enable \
    "${LOG_ARGS[@]}" \
    "${MEDS_ARGS[@]}" \
    "$@"
