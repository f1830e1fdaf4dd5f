"""``python -m meds_patch demo``: upstream's real ``train_ppo_ray --meds`` on a CPU machine, as a Ray job.

It starts a Ray cluster of its own (free ports, its own temp dirs; a head with two declared GPUs, one for policy
rank 0 and one for the vLLM engine, and with ``--nodes N`` N - 1 more nodes at 127.0.0.2, ... with one GPU each, for
the other ranks), prepares the tiny fine-tuned model and a few arithmetic questions that repeat every step, and
submits ``python -m openrlhf.cli.train_ppo_ray --meds ...`` with ``ray job submit``: vLLM rollouts, the math reward
function, DeepSpeed steps, weight sync and checkpoints, with the CPU backend (``cpu_backend``) adapting the few
CUDA-only calls. Each step's ``train/meds/*`` values are printed as TensorBoard receives them. The cluster is
stopped on exit, error, Ctrl-C or SIGTERM: every process its ``ray start`` commands started, the job's driver
included, and nothing else.
"""

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import types
from typing import Callable, List, Optional

from meds_patch.cpu.cluster import (
    CPU_ENV,
    CPU_FLAGS,
    REWARD_FUNC,
    LocalRayCluster,
    actor_nodes,
    run_job,
    scalars,
    submit,
)

QUESTIONS = [(7, 8), (9, 6), (5, 9), (8, 8)]  # sums the tiny model gets right only sometimes


def training_args(model: str, prompts: str, save: str, episodes: int, meds: bool = True, nodes: int = 1) -> List[str]:
    """The arguments of a tiny CPU run: one step per episode over the same questions, a checkpoint every step;
    with ``nodes`` > 1, one policy rank per node and a memory sharded over that many actors."""
    args = [
        "--actor.model_name_or_path", model, "--reward.remote_url", REWARD_FUNC,
        "--data.prompt_dataset", prompts, "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.max_len", "128", "--rollout.max_new_tokens", "40", "--data.max_samples", str(len(QUESTIONS)),
        "--actor.num_nodes", str(nodes), "--actor.num_gpus_per_node", "1",
        *CPU_FLAGS, "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
        "--rollout.batch_size", str(len(QUESTIONS)), "--rollout.n_samples_per_prompt", "8",
        "--rollout.micro_batch_size", "8", "--train.batch_size", "32", "--train.micro_batch_size", "8",
        "--train.num_episodes", str(episodes), "--rollout.temperature", "1.0",
        "--actor.adam.lr", "1e-4", "--actor.lr_scheduler", "constant",
        "--ckpt.path", os.path.join(save, "ckpt"), "--ckpt.save_steps", "1", "--ckpt.load_enable",
        "--ckpt.output_dir", os.path.join(save, "model"),  # the trained model (upstream's default: ./ckpt)
        "--logger.tensorboard_dir", os.path.join(save, "tensorboard"), "--logger.wandb.run_name", "demo",
    ]  # fmt: skip
    if meds:
        args += ["--meds", "--algo.meds.num_layers", "4"]
        if nodes > 1:
            args += ["--algo.meds.num_workers", str(nodes)]
    return args


class StepPrinter:
    """Prints each new step's ``train/meds/*`` values (polled from TensorBoard) and the job's MEDS lines."""

    SHOWN = ("penalty_mean", "penalty_max", "penalised_wrong_share", "stored_vectors", "clusters",
             "without_feature_share", "wrong_answers_distinct_per_question")  # fmt: skip

    def __init__(self, tensorboard_dir: str, cluster: Optional[LocalRayCluster] = None):
        # A resumed run appends to the same events: its earlier steps were printed by the earlier run.
        self.tensorboard_dir, self.printed, self.polled = tensorboard_dir, set(scalars(tensorboard_dir)), 0.0
        self.cluster = cluster  # given: where the actors run is printed after the first step

    def __call__(self, line: str) -> None:
        if "MEDS" in line or "Error" in line:
            line = line.strip()
            print(f"  job: {line if line.startswith('MEDS: ') else line[:200]}", flush=True)  # ours in full
        if time.time() - self.polled > 2:
            self.poll()

    def poll(self) -> None:
        self.polled = time.time()
        for step, values in sorted(scalars(self.tensorboard_dir, "train/").items()):
            if step not in self.printed and any(k.startswith("train/meds/") for k in values):
                self.printed.add(step)
                shown = " ".join(
                    f"{k}={values['train/meds/' + k]:.3g}" for k in self.SHOWN if "train/meds/" + k in values
                )
                print(f"step {step}: reward={values.get('train/reward', float('nan')):.3f} {shown}", flush=True)
                if self.cluster is not None:
                    for name, where in actor_nodes(self.cluster).items():
                        print(f"  {name}: {', '.join(where)}", flush=True)
                    self.cluster = None


def follow_job(cluster, save: str, job: Callable, what: str) -> int:
    """Start ``cluster`` (a context manager), run ``job(cluster, on_line)`` in it, print each step's MEDS values as
    they arrive, and stop the cluster on exit, error, Ctrl-C or SIGTERM. Returns the job's exit code; on failure the
    end of ``save``/job.log is printed."""
    # A signal can land in library code that swallows the exception (a bare ``except:`` around an import): it is
    # raised again at each job line.
    signals = []

    def stop_on(signum, frame):
        signals.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def on_line(line):
        if signals:
            stop_on(signals[0], None)
        printer(line)

    signal.signal(signal.SIGINT, stop_on)
    signal.signal(signal.SIGTERM, stop_on)
    with cluster as cluster:
        print(f"submitting {what}; job log: {save}/job.log", flush=True)
        printer = StepPrinter(os.path.join(save, "tensorboard"), cluster)
        code = job(cluster, on_line)
        if signals:  # the last line came before the signal was raised again
            stop_on(signals[0], None)
        printer.poll()
    if code != 0:
        with open(os.path.join(save, "job.log"), errors="replace") as fh:
            print("".join(fh.readlines()[-40:]), file=sys.stderr)
        print(f"meds_patch demo: the job failed (exit code {code}); full log: {save}/job.log", file=sys.stderr)
    return code


def run_demo(
    steps: int = 6,
    save: Optional[str] = None,
    resume: Optional[str] = None,
    nodes: Optional[int] = None,
    address: Optional[str] = None,
    alpha: Optional[float] = None,
) -> int:
    """Train the tiny model for ``steps`` through ``ray job submit``, on a local Ray cluster of ``nodes`` (default 1)
    started and stopped here, or on the running cluster whose job API is ``address`` (the CPU recipe under Slurm).
    A resumed run goes on with the options it was started with; an ``alpha`` given again replaces its own."""
    from meds_patch.cpu.tiny_math import prepared_model, write_prompts

    start = time.time()
    save = os.path.abspath(resume or save or tempfile.mkdtemp(prefix="meds-demo-"))
    state_file = os.path.join(save, "demo.json")
    done = 0
    if resume:
        if not os.path.isfile(state_file):
            print(f"meds_patch demo: {save} holds no demo run to resume (no demo.json)", file=sys.stderr)
            return 2
        with open(state_file) as fh:
            state = json.load(fh)
        done, saved_nodes, saved_alpha = state["steps"], state.get("nodes", 1), state.get("alpha")
        # The checkpoint holds one DeepSpeed state per rank: the ranks cannot change.
        if nodes is not None and nodes != saved_nodes:
            print(f"meds_patch demo: {save} was trained on {saved_nodes} node(s): resume it without --nodes, or with "
                  f"--nodes {saved_nodes}", file=sys.stderr)  # fmt: skip
            return 2
        nodes = saved_nodes
        if alpha is None:
            alpha = saved_alpha
        elif alpha != saved_alpha:
            print(f"meds_patch demo: --alpha {alpha} replaces the run's "
                  f"{'default' if saved_alpha is None else saved_alpha} from step {done + 1}", flush=True)  # fmt: skip
    elif os.path.exists(os.path.join(save, "ckpt")):
        print(f"meds_patch demo: {save} already holds a run: use --resume {save}, or another --save", file=sys.stderr)
        return 2
    nodes = nodes or 1
    os.makedirs(save, exist_ok=True)
    print("preparing the tiny model (cached after the first time) ...", flush=True)
    model = prepared_model()
    prompts = write_prompts(os.path.join(save, "prompts.jsonl"), QUESTIONS)
    args = training_args(model, prompts, save, episodes=done + steps, nodes=nodes)
    if alpha is not None:
        args += ["--algo.meds.alpha", str(alpha)]
    if address is None:
        # The head's 2 GPUs take the vLLM engine and policy rank 0, each further node's 1 GPU one more rank: Ray
        # places the engine first (its placement group is ready before the policy is created), so each node gets one.
        cluster = LocalRayCluster(env=CPU_ENV, nodes=nodes, node_gpus=1)
        print(f"starting a local Ray cluster of {nodes} node{'s' * (nodes > 1)} ({1 + nodes} declared GPUs, temp "
              f"dir {cluster.temp_dir}) ...", flush=True)  # fmt: skip
    else:  # someone else's cluster: used as it is, and left running
        cluster = contextlib.nullcontext(types.SimpleNamespace(address=address, env=dict(os.environ)))
    what = (f"train_ppo_ray --meds ({'resuming at step ' + str(done + 1) if resume else 'new run'}, "
            f"alpha {'default' if alpha is None else alpha})")  # fmt: skip
    code = follow_job(cluster, save, lambda cluster, on_line: submit(cluster, args, f"{save}/job.log", on_line), what)
    if code != 0:
        return 1
    with open(state_file, "w") as fh:
        json.dump({"steps": done + steps, "nodes": nodes, "alpha": alpha}, fh)
    print(f"done in {time.time() - start:.0f} s: checkpoints in {save}/ckpt, TensorBoard events in {save}/tensorboard")
    print(f"continue with: python -m meds_patch demo --resume {save}")
    return 0


# Sums the recipe model gets right about half the time (so DAPO's filter keeps their groups), and others to evaluate.
RECIPE_QUESTIONS = [(5, 3), (3, 8), (6, 4), (7, 8), (2, 5), (5, 8), (8, 6), (2, 9)]
RECIPE_EVAL_QUESTIONS = [(4, 7), (6, 6), (4, 3), (7, 3)]
# What a CPU cannot do as a GPU recipe asks, appended after the recipe's own flags (the last value of a flag wins),
# each with its reason. Everything else runs as the recipe writes it: packing with flash-attention 2, ZeRO-3,
# colocation, DeepSpeed's and vLLM's sleep, gradient checkpointing, the arm's options, evaluation, save_hf. The CPU
# backend (backend.py) adapts the rest underneath: flash-attention's kernels and transformers' checks for them,
# vLLM's sleep check (its CPU worker sleeps as a no-op), NCCL weight-sync groups, CUDA device calls.
RECIPE_CPU_ARGS = [
    (["--vllm.sync_backend", "gloo"], "NCCL needs CUDA (with colocation, upstream would send weights as CUDA IPC)"),
    (["--vllm.enforce_eager"], "no CUDA graphs on a CPU"),
    (["--rollout.batch_size", str(len(RECIPE_QUESTIONS)), "--rollout.n_samples_per_prompt", "8",
      "--train.batch_size", "16"], "a step of 512 prompts x 16 samples would take a day on a laptop: 8 x 8"),
]  # fmt: skip


def run_recipe(recipe: str, steps: int, save: Optional[str], extra: List[str]) -> int:
    """Run a GPU recipe script (examples/scripts/train_meds_*.sh) unchanged on a local Ray cluster of one node with
    two declared GPUs: the recipe's own variables point it at the 14-block tiny model, the sums as its dataset and
    evaluation set, short lengths and this cluster; ``RECIPE_CPU_ARGS`` and then ``extra`` follow its flags. ALGO,
    MEDS and ALPHA come from the environment, as the recipes take them."""
    from meds_patch.cpu.tiny_math import QUESTION, recipe_model

    start = time.time()
    recipe = os.path.abspath(recipe)
    if not os.path.isfile(recipe):
        print(f"meds_patch demo: no recipe script at {recipe}", file=sys.stderr)
        return 2
    save = os.path.abspath(save or tempfile.mkdtemp(prefix="meds-recipe-"))
    os.makedirs(save, exist_ok=True)
    print("preparing the 14-block tiny model (cached after the first time) ...", flush=True)
    model = recipe_model()

    def write_sums(name, pairs):  # the recipes' dataset format: the bare question and its answer
        path = os.path.join(save, name)
        with open(path, "w") as fh:
            fh.writelines(
                json.dumps({"problem": QUESTION.format(a=a, b=b), "answer": str(a + b)}) + "\n" for a, b in pairs
            )
        return path

    cluster = LocalRayCluster(env=CPU_ENV, num_gpus=2)
    variables = {
        "MODEL": model, "DATASET": write_sums("sums.jsonl", RECIPE_QUESTIONS),
        "EVAL_DATASET": write_sums("sums_eval.jsonl", RECIPE_EVAL_QUESTIONS),
        # Responses up to 576 tokens: the DAPO arm's overlong buffer (512) then starts at 64 tokens, past the model's
        # answers (about 20), as the recipe's 3072 - 512 is past a 7B model's usual ones.
        "PROMPT_MAX_LEN": "64", "RESPONSE_MAX_LEN": "576",
        # Groups of 8 in micro-batches of 4: every group DAPO's filter keeps gives each of the two ranks one. With 8,
        # an odd number of kept groups gives one rank a micro-batch more, and upstream's training step then waits in
        # a collective for good (on GPUs the filter draws new prompts until the batch is full; 8 questions cannot).
        "MICRO_ROLLOUT_BATCH_SIZE": "4",
        "NUM_NODES": "1", "GPUS_PER_NODE": "2", "NUM_EPISODES": str(steps), "SAVE_STEPS": "1", "SAVE_DIR": save,
        "RAY_ADDRESS": cluster.address,
    }  # fmt: skip
    # The recipe calls `ray` and its job calls `python3`: this environment's, first on the PATH.
    cluster.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + cluster.env.get("PATH", "")
    env = {**cluster.env, **variables}
    command = ["bash", recipe, *[arg for args, _ in RECIPE_CPU_ARGS for arg in args], *extra]
    print(f"recipe variables: {' '.join(f'{k}={v}' for k, v in variables.items())}", flush=True)
    for args, reason in RECIPE_CPU_ARGS:
        print(f"appended {' '.join(args)}: {reason}", flush=True)
    what = f"{os.path.basename(recipe)} (ALGO={os.environ.get('ALGO', 'dapo')} MEDS={os.environ.get('MEDS', '1')})"
    code = follow_job(
        cluster,
        save,
        lambda cluster, on_line: run_job(cluster, command, os.path.join(save, "job.log"), on_line, env=env),
        what,
    )
    if code != 0:
        return 1
    print(f"done in {time.time() - start:.0f} s: checkpoints in {save}/ckpt, TensorBoard events in {save}/tensorboard")
    return 0
