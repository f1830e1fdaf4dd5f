#!/usr/bin/env bash
#SBATCH --job-name=meds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
##SBATCH --partition=<partition>
##SBATCH --account=<account>

# A Ray cluster on the Slurm allocation (head on the first node, a worker on each other node), then one MEDS
# recipe submitted to it. Submit from the repository root:
#
#   sbatch examples/scripts/train_meds_ray_slurm.sh
#   RECIPE=train_meds_dapo_qwen3_8b_base.sh MEDS=0 sbatch examples/scripts/train_meds_ray_slurm.sh
#
# Every node must see the same Python environment with this package installed and its import hook active
# (README, "Install on a GPU cluster"): the hook patches each process, and Ray runs the trainer's actors on every
# node. ENV_SETUP is sourced on each node before Ray starts. Other variables (MEDS, MODEL, DATASET, SAVE_DIR, ...)
# reach the recipe unchanged; NUM_NODES and GPUS_PER_NODE are set from the allocation.
set -euo pipefail

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}" # sbatch runs a copy of this file, so not relative to it
RECIPE="${RECIPE:-train_meds_dapo_qwen2.5_math_7b.sh}"
ENV_SETUP="${ENV_SETUP:-source $REPO_DIR/.venv/bin/activate}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}" # --gpus-per-node may read "type:count"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
RAY_START_TIMEOUT="${RAY_START_TIMEOUT:-600}"

recipe_path="$REPO_DIR/examples/scripts/$RECIPE"
[[ -f "$recipe_path" ]] || { echo "no recipe $recipe_path (submit from the repository root or set REPO_DIR)" >&2; exit 2; }

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
num_nodes=${#nodes[@]}
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
echo "$(date '+%F %T') job $SLURM_JOB_ID: $num_nodes nodes, Ray head $head_node ($head_ip:$RAY_PORT)"

# Ray daemons run as background job steps with --block, so they live as long as the allocation.
srun --nodes=1 --ntasks=1 -w "$head_node" bash -c \
    "$ENV_SETUP && ray start --head --node-ip-address=$head_ip --port=$RAY_PORT \
     --dashboard-host=0.0.0.0 --dashboard-port=$DASHBOARD_PORT --num-gpus=$GPUS_PER_NODE --block" &
sleep 10
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" bash -c \
        "$ENV_SETUP && ray start --address=$head_ip:$RAY_PORT --num-gpus=$GPUS_PER_NODE --block" &
done

# Wait until every node has joined, instead of a fixed sleep.
waited=0
until alive=$(srun --overlap --nodes=1 --ntasks=1 -w "$head_node" bash -c "$ENV_SETUP && python3 -c \
    'import ray; ray.init(address=\"$head_ip:$RAY_PORT\", logging_level=\"ERROR\"); \
     print(sum(n[\"Alive\"] for n in ray.nodes()))'" 2>/dev/null | tail -n 1) && [[ "$alive" == "$num_nodes" ]]; do
    if ((waited >= RAY_START_TIMEOUT)); then
        echo "only ${alive:-0} of $num_nodes Ray nodes joined after ${RAY_START_TIMEOUT}s" >&2
        exit 1
    fi
    sleep 10
    waited=$((waited + 10))
done
echo "$(date '+%F %T') all $num_nodes Ray nodes are up; submitting $RECIPE"

# `ray job submit` follows the job's log until it ends, and exits non-zero if the job failed.
status=0
srun --overlap --nodes=1 --ntasks=1 -w "$head_node" bash -c \
    "$ENV_SETUP && cd '$REPO_DIR' && \
     RAY_ADDRESS=http://$head_ip:$DASHBOARD_PORT NUM_NODES=$num_nodes GPUS_PER_NODE=$GPUS_PER_NODE \
     REPO_DIR='$REPO_DIR' bash '$recipe_path'" || status=$?

srun --overlap --nodes="$num_nodes" --ntasks-per-node=1 bash -c "$ENV_SETUP && ray stop --force" || true
echo "$(date '+%F %T') job $SLURM_JOB_ID finished with status $status"
exit "$status"
