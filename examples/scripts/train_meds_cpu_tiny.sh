#!/usr/bin/env bash
# MEDS on CPU, for trying the Slurm launcher without GPUs (MEDS_CPU=1 in train_meds_ray_slurm.sh makes it the
# default RECIPE): the CPU harness's tiny model learns sums through upstream's train_ppo_ray --meds, with one vLLM
# engine and one policy rank per node, as a job on the Ray cluster at RAY_ADDRESS (`python -m meds_patch demo
# --address`). Run it in the CPU environment that scripts/install.sh builds, on a cluster whose processes have
# the CPU backend's environment (the launcher's MEDS_CPU=1 sets it).
#
#   MEDS=0: the baseline (alpha 0: the memory runs, no reward changes); ALPHA, NUM_NODES, SAVE_DIR as the GPU
#   recipes take them; NUM_EPISODES training steps (one per episode). A SAVE_DIR that holds a run is resumed.
set -euo pipefail

MEDS="${MEDS:-1}"
case "$MEDS" in 0 | 1) ;; *) echo "MEDS must be 0 or 1, got '$MEDS'" >&2 && exit 2 ;; esac
ALPHA="${ALPHA:-0.1}"
NUM_NODES="${NUM_NODES:-1}"
NUM_EPISODES="${NUM_EPISODES:-2}"
SAVE_DIR="${SAVE_DIR:-$HOME/checkpoints/meds/cpu-tiny$([[ $MEDS == 1 ]] && echo -meds || true)}"
if [[ $MEDS == 1 ]]; then PENALTY_ALPHA=$ALPHA; else PENALTY_ALPHA=0; fi
if [[ -f $SAVE_DIR/demo.json ]]; then RUN=(--resume "$SAVE_DIR"); else RUN=(--save "$SAVE_DIR"); fi

exec python3 -m meds_patch demo --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" "${RUN[@]}" \
    --nodes "$NUM_NODES" --steps "$NUM_EPISODES" --alpha "$PENALTY_ALPHA"
