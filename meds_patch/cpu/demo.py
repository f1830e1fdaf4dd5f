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
from typing import List, Optional

from meds_patch.cpu.cluster import CPU_ENV, CPU_FLAGS, REWARD_FUNC, LocalRayCluster, actor_nodes, scalars, submit

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
            print(f"  job: {line.strip()[:200]}", flush=True)
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
    # Ctrl-C and SIGTERM end the demo through the with-block, which stops the cluster. A signal can land in library
    # code that swallows the exception (a bare ``except:`` around an import): it is raised again at each job line.
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
        print(f"submitting train_ppo_ray --meds ({'resuming at step ' + str(done + 1) if resume else 'new run'}, "
              f"alpha {'default' if alpha is None else alpha}); job log: {save}/job.log", flush=True)  # fmt: skip
        printer = StepPrinter(os.path.join(save, "tensorboard"), cluster)
        code = submit(cluster, args, os.path.join(save, "job.log"), on_line)
        if signals:  # the last line came before the signal was raised again
            stop_on(signals[0], None)
        printer.poll()
    if code != 0:
        with open(os.path.join(save, "job.log"), errors="replace") as fh:
            print("".join(fh.readlines()[-40:]), file=sys.stderr)
        print(
            f"meds_patch demo: the job failed (ray job submit exited {code}); full log: {save}/job.log",
            file=sys.stderr,
        )
        return 1
    with open(state_file, "w") as fh:
        json.dump({"steps": done + steps, "nodes": nodes, "alpha": alpha}, fh)
    print(f"done in {time.time() - start:.0f} s: checkpoints in {save}/ckpt, TensorBoard events in {save}/tensorboard")
    print(f"continue with: python -m meds_patch demo --resume {save}")
    return 0
