#!/usr/bin/env bash
# What every MEDS recipe shares: sourced by examples/scripts/train_meds_<model>.sh after they set MODEL, ALPHA,
# PROMPT_MAX_LEN, RESPONSE_MAX_LEN, the micro-batch sizes and RUN_BASE. Arguments are the recipe's; they reach the
# trainer last, so they override any flag below.
#
# Two switches pick the run: ALGO=dapo|grpo|grpo_entropy_adv and MEDS=1|0. The settings are the authors' veRL
# scripts (github.com/Linxi000/MEDS, recipe/MEDS/) mapped onto OpenRLHF 0.11.2 flags, one comment per mapping:
#   ALGO=dapo MEDS=1              run_meds.sh    DAPO + MEDS
#   ALGO=dapo MEDS=0              run_dapo.sh    the DAPO baseline (run_meds.sh without the penalty)
#   ALGO=grpo MEDS=0              run_grpo.sh    the GRPO baseline
#   ALGO=grpo MEDS=1              run_grpo.sh plus the MEDS penalty (the authors publish no script for it)
#   ALGO=grpo_entropy_adv MEDS=0  run_grpo_entropy_adv.sh: the entropy-advantage baseline (Cheng et al. 2025)
# "verl default" marks a setting their scripts leave at the default of veRL's config files in their fork.

# ── Switches, paths, cluster shape ──
MEDS="${MEDS:-1}"
case "$MEDS" in 0 | 1) ;; *) echo "MEDS must be 0 or 1, got '$MEDS'" >&2 && exit 2 ;; esac
ALGO="${ALGO:-dapo}"
case "$ALGO" in dapo | grpo | grpo_entropy_adv) ;; *)
    echo "ALGO must be dapo, grpo or grpo_entropy_adv, got '$ALGO'" >&2 && exit 2 ;;
esac
RUN_NAME="${RUN_NAME:-$RUN_BASE-$ALGO$([[ $MEDS == 1 ]] && echo -meds || true)}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# One JSON row per question: the bare question and its reference answer (DAPO-Math-17K + MATH levels 3-5,
# deduplicated). The Qwen-Math instruction comes from PROMPT_TEMPLATE below, so it must not be in the data.
DATASET="${DATASET:-$HOME/data/dapo17k_math_l3to5.jsonl}"
INPUT_KEY="${INPUT_KEY:-problem}"
LABEL_KEY="${LABEL_KEY:-answer}"
# The authors validate on AIME 2024 (TEST_FILE=aime-2024.parquet). Several files can be given, comma-separated,
# but 0.11.2 reports eval metrics per `datasource` field and pools rows without one under eval_default_*.
EVAL_DATASET="${EVAL_DATASET:-$(dirname "$DATASET")/aime24.jsonl}"
# Each run gets its own directory: --ckpt.load_enable must never resume another arm's run.
SAVE_DIR="${SAVE_DIR:-$HOME/checkpoints/meds/$RUN_NAME}"
SAVE_STEPS="${SAVE_STEPS:-50}"       # trainer.save_freq=50
NUM_EPISODES="${NUM_EPISODES:-100}" # trainer.total_epochs=100
NUM_NODES="${NUM_NODES:-1}"         # NNODES=1 and trainer.n_gpus_per_node=8: one node of 8 GPUs
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
VLLM_TP="${VLLM_TP:-1}" # rollout.tensor_model_parallel_size=1
VLLM_GPU_MEMORY="${VLLM_GPU_MEMORY:-0.6}"
MEDS_NUM_WORKERS="${MEDS_NUM_WORKERS:-0}"

# 0.11.2 has no prompt-length flag: prompts are cut to data.max_len - rollout.max_new_tokens tokens, keeping the
# end (as data.truncation=left does), and the DAPO overlong buffer counts back from rollout.max_new_tokens.
MAX_LEN=$((PROMPT_MAX_LEN + RESPONSE_MAX_LEN))
# The Qwen-Math prompt. The template goes through str.format, so its literal \boxed{} is written \boxed{{}}.
PROMPT_TEMPLATE=$'<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n'
PROMPT_TEMPLATE="${INPUT_TEMPLATE:-$PROMPT_TEMPLATE}"

# ── The arm ──
# optim.lr_warmup_steps=10 (DAPO, entropy advantage) counts RL steps (veRL steps the scheduler once per RL step).
# 0.11.2 takes a warm-up *ratio* of a horizon that uses every prompt once per episode, N * 16 / train.batch_size *
# episodes optimizer steps, so 10 RL steps of 512 prompts are 10 * 512 / (N * episodes) of it for any
# train.batch_size. N: the lines of a local JSONL dataset, else NUM_PROMPTS (default: an estimate, 23k).
if [[ -z "${NUM_PROMPTS:-}" ]]; then
    if [[ -f "$DATASET" ]]; then NUM_PROMPTS=$(wc -l <"$DATASET"); else NUM_PROMPTS=23000; fi
fi
WARMUP_RATIO=$(awk -v n="$NUM_PROMPTS" -v e="$NUM_EPISODES" \
    'BEGIN { r = 10 * 512 / (n * e); printf "%.12g", (r < 1 ? r : 1) }')
if [[ $ALGO == dapo ]]; then
    ARM_ARGS=(
        --algo.advantage.estimator group_norm       # algorithm.adv_estimator=grpo: (r - mean) / std per group
        --algo.kl.init_coef 0                       # use_kl_loss=False, use_kl_in_reward=False: no reference model
        --actor.eps_clip_low_high 0.2 0.28          # clip_ratio_low=0.2, clip_ratio_high=0.28
        --actor.dual_clip 10                        # clip_ratio_c=10.0
        --actor.loss_agg_mode token-mean            # loss_agg_mode=token-mean
        --reward.overlong_buffer_len 512            # overlong_buffer.enable=True, overlong_buffer.len=512
        --reward.overlong_penalty_factor 1.0        # overlong_buffer.penalty_factor=1.0
        --algo.dynamic_filtering_enable             # filter_groups.enable=True, filter_groups.metric=acc: keep the
        --algo.dynamic_filtering_range 0 1          #   groups whose mean 0/1 score is strictly between 0 and 1
        --train.batch_size 256                      # ppo_mini_batch_size=16 prompts x 16: 32 updates per RL step
        --actor.adam.weight_decay 0.1               # optim.weight_decay=0.1
        --actor.lr_scheduler constant_with_warmup   # optim.lr_warmup_steps=10, then verl's constant lr
        --actor.lr_warmup_ratio "$WARMUP_RATIO"
    )
    # No 0.11.2 equivalent: filter_groups.max_num_gen_batches=10. 0.11.2 keeps drawing prompts until 512 groups
    # pass the filter (or the episode's prompts run out), without a cap.
elif [[ $ALGO == grpo_entropy_adv ]]; then
    # run_grpo_entropy_adv.sh runs veRL's DAPO trainer with GRPO's estimator, a KL loss, symmetric clipping and
    # neither the group filter nor the overlong buffer. It sets entropy_coeff=0, with which the authors' actor
    # computes no entropy, so the published script fails at its first update; ours computes it (no entropy loss).
    ARM_ARGS=(
        --algo.advantage.estimator group_norm       # adv_estimator=grpo
        --algo.kl.use_loss                          # use_kl_loss=True, use_kl_in_reward=False
        --algo.kl.init_coef 0.001                   # kl_loss_coef=0.001
        --algo.kl.estimator k3                      # verl default kl_loss_type=low_var_kl (k3 clamped to [-10, 10])
        --actor.eps_clip_low_high 0.2 0.2           # clip_ratio_low=0.2, clip_ratio_high=0.2
        --actor.dual_clip 10                        # clip_ratio_c=10.0
        --actor.loss_agg_mode seq-mean-token-mean   # loss_agg_mode=seq-mean-token-mean
        --train.batch_size 256                      # train_prompt_mini_bsz=16 prompts x 16: 32 updates per RL step
        --actor.adam.weight_decay 0.1               # optim.weight_decay=0.1
        --actor.lr_scheduler constant_with_warmup   # optim.lr_warmup_steps=10, then verl's constant lr
        --actor.lr_warmup_ratio "$WARMUP_RATIO"
        --algo.entropy_advantage.enable             # +actor.use_entropy_advantage=True: A + min(0.4 H, |A| / 2)
    )
    # The reference model is not offloaded here (offload=False sets ref.fsdp_config.param_offload=False).
else
    ARM_ARGS=(
        --algo.advantage.estimator group_norm       # algorithm.adv_estimator=grpo
        --algo.kl.use_loss                          # use_kl_loss=True, use_kl_in_reward=False
        --algo.kl.init_coef 0.001                   # kl_loss_coef=0.001
        --algo.kl.estimator k3                      # kl_loss_type=low_var_kl: both are k3 clamped to [-10, 10]
        --ref.offload                               # ref.fsdp_config.param_offload=True
        --actor.eps_clip_low_high 0.2 0.2           # verl default clip_ratio_low = clip_ratio_high = 0.2
        --actor.dual_clip 3                         # verl default clip_ratio_c=3.0
        --actor.loss_agg_mode seq-mean-token-mean   # loss_agg_mode=seq-mean-token-mean
        --train.batch_size 512                      # ppo_mini_batch_size=32 prompts x 16: 16 updates per RL step
        --actor.adam.weight_decay 0.01              # verl default optim.weight_decay=0.01
        --actor.lr_scheduler constant               # verl default: lr_warmup_steps=-1, warm-up ratio 0, constant
    )
    # verl.trainer.main_ppo with reward_manager=naive: no overlong buffer and no dynamic filtering, so neither flag.
    # No 0.11.2 equivalent: (1) veRL aggregates the KL loss with loss_agg_mode, 0.11.2 always token-means it;
    # (2) data.truncation=error with filter_overlong_prompts=True drops prompts over 1024 tokens, 0.11.2 cuts them
    # (drop them from the dataset to match).
fi

# ── MEDS: both arms run the glue, so both log train/meds/* and eval_unbiased_pass@k ──
# The baseline runs it with alpha 0: beta defaults to 2 * alpha = 0, so every penalty is p = min(0 * ln(n+1), 0) =
# 0 and every reward stays bit for bit what it was (r - 0 = r, r / (1 + 0) = r; tests/test_recipes.py checks it
# through the glue). Its memory still clusters each step's wrong answers: the same work as in the MEDS run.
# Reference MEDS otherwise: wrong rollouts penalised, K = 14 layers (run_meds.sh: use_last_n_layers=14,
# cluster_penalty_target=wrong). MEDS_NUM_WORKERS > 0 spreads the memory over that many Ray CPU actors.
if [[ $MEDS == 1 ]]; then PENALTY_ALPHA=$ALPHA; else PENALTY_ALPHA=0; fi
MEDS_ARGS=(--meds --algo.meds.alpha "$PENALTY_ALPHA" --algo.meds.num_layers 14 --algo.meds.target wrong
    --algo.meds.num_workers "$MEDS_NUM_WORKERS")

LOG_ARGS=(--logger.tensorboard_dir "$SAVE_DIR/tensorboard" --logger.wandb.run_name "$RUN_NAME")
if [[ -n "${WANDB_API_KEY:-}" ]]; then
    # The key never goes on a command line: ps, Ray's job table and the wandb run config (upstream logs every flag
    # there) would show it. Upstream's logger starts for any non-empty --logger.wandb.key and logs in with it only
    # when wandb finds no key of its own, and wandb reads WANDB_API_KEY from the environment, which Ray workers
    # inherit from `ray start` on their node (the Slurm script passes it that way).
    LOG_ARGS+=(--logger.wandb.key from-environment --logger.wandb.project "${WANDB_PROJECT:-meds}")
fi

# No 0.11.2 equivalent: trainer.val_before_train=True. 0.11.2 evaluates only after steps that are multiples of
# --eval.steps (the async trainer skips step 0 explicitly), so the first AIME number is step 2's.
# Performance only: veRL's use_dynamic_bsz token budgets ("Mathematically equivalent", says run_meds.sh) are
# fixed micro-batches here (MICRO_*_BATCH_SIZE).
# actor.entropy_coeff=0 (no entropy bonus) is 0.11.2's default, --actor.entropy_coef None. Appending
# `--actor.entropy_coef 0` logs the policy's entropy too, at the cost of a softmax over the whole vocabulary for
# every token of a training micro-batch.
SHARED_ARGS=(
    --rollout.temperature 1.0                     # rollout.temperature=1.0 (top_k=-1 is 0.11.2's default too)
    --rollout.top_p 1.0                           # rollout.top_p=1.0
    --rollout.batch_size 512                      # data.train_batch_size=512 (DAPO: gen_batch_size=512 too)
    --rollout.n_samples_per_prompt 16             # rollout.n=16
    --train.max_epochs 1                          # verl default ppo_epochs=1
    --actor.adam.lr 1e-6                          # optim.lr=1e-6
    --actor.adam.betas 0.9 0.999                  # verl default optim.betas (0.11.2's default: 0.9 0.95)
    --actor.max_norm 1.0                          # grad_clip=1.0 (DAPO), verl default grad_clip=1.0 (GRPO)
    --actor.gradient_checkpointing_enable         # model.enable_gradient_checkpointing=True
    --eval.dataset "$EVAL_DATASET"                # data.val_files=aime-2024.parquet
    --eval.steps 2                                # trainer.test_freq=2
    --eval.temperature 1.0                        # val_kwargs.temperature=1.0 (run_grpo.sh keeps verl's greedy
    --eval.n_samples_per_prompt 1                 #   default: one setting for every arm); val_kwargs.n=1
    --ckpt.save_steps "$SAVE_STEPS"               # trainer.save_freq=50
    --ckpt.best_metric_key none                   # veRL keeps no best-eval checkpoints (0.11.2 would write one at
)                                                 #   every new best AIME score, every 2 steps at worst)

# Hybrid engine: actor, reference model (GRPO only) and vLLM engines share every GPU and sleep in turn.
# --ckpt.load_enable resumes from $SAVE_DIR/ckpt (MEDS error memory included) when it exists, and starts fresh
# otherwise (run_meds.sh sets trainer.resume_mode=disable; resuming changes nothing for a run that never stops).
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
    --ref.num_nodes "$NUM_NODES" \
    --ref.num_gpus_per_node "$GPUS_PER_NODE" \
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
    --rollout.micro_batch_size "$MICRO_ROLLOUT_BATCH_SIZE" \
    --train.micro_batch_size "$MICRO_TRAIN_BATCH_SIZE" \
    --train.num_episodes "$NUM_EPISODES" \
    --ckpt.output_dir "$SAVE_DIR" \
    --ckpt.path "$SAVE_DIR/ckpt" \
    --ckpt.save_hf \
    --ckpt.load_enable \
    "${ARM_ARGS[@]}" \
    "${SHARED_ARGS[@]}" \
    "${LOG_ARGS[@]}" \
    "${MEDS_ARGS[@]}" \
    "$@"
