"""``python -m meds_patch demo``: upstream's real ``train_ppo_ray --meds`` on a CPU machine, as a Ray job.

It starts a Ray head of its own (free ports, its own temp dir, two declared GPUs: one for the policy actor, one
for the vLLM engine), prepares the tiny fine-tuned model and a few arithmetic questions that repeat every step,
and submits ``python -m openrlhf.cli.train_ppo_ray --meds ...`` with ``ray job submit``: vLLM rollouts, the math
reward function, DeepSpeed steps, weight sync and checkpoints, with the CPU backend (``cpu_backend``) adapting the
few CUDA-only calls. Each step's ``train/meds/*`` values are printed as TensorBoard receives them. The cluster is
stopped on exit, error or Ctrl-C, by the process group of the ``ray start`` it launched, and nothing else.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Callable, Dict, List, Optional, Sequence

import meds_patch.tools

# The reward file handed to OpenRLHF (which loads it by path): the package's own, so an installed wheel runs the
# demo without a checkout (examples/reward_func_math.py, the user-facing copy, re-exports the same function).
REWARD_FUNC = os.path.join(os.path.dirname(os.path.abspath(meds_patch.tools.__file__)), "reward_func_math.py")
# The engine's environment on CPU: a 1 GiB KV cache, and no pinning of OpenMP threads to cores that other
# processes of the run (and other jobs on the machine) also use.
CPU_ENV = {"MEDS_CPU_BACKEND": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
QUESTIONS = [(7, 8), (9, 6), (5, 9), (8, 8)]  # sums the tiny model gets right only sometimes


def free_ports(count: int) -> List[int]:
    """Ports free now, all different: the sockets stay bound until every port is picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


class LocalRayCluster:
    """A Ray head of our own: ``ray start --head --block`` in a new session, stopped by killing that session's
    process group. Every port is picked free and the temp dir is private, so it coexists with other clusters and
    ignores ``RAY_ADDRESS``."""

    def __init__(self, num_gpus: int = 2, num_cpus: int = 8, env: Optional[Dict[str, str]] = None):
        self.temp_dir = tempfile.mkdtemp(prefix="meds-ray-", dir="/tmp")  # short: Ray's socket paths live in it
        flags = ["--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
                 "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port"]  # fmt: skip
        ports = dict(zip(flags, free_ports(len(flags))))
        self.gcs_port, self.dashboard_port = ports["--port"], ports["--dashboard-port"]
        self.command = [
            os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--temp-dir", self.temp_dir,
            "--num-gpus", str(num_gpus), "--num-cpus", str(num_cpus), "--object-store-memory", str(1 << 30),
            "--disable-usage-stats", *[str(x) for item in ports.items() for x in item],
        ]  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # On two busy cores the dashboard's modules can take longer than Ray's default 30 s to come up.
        self.env["RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT"] = "180"
        self.env.update(env or {})
        self.process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        """The job API (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """For ``ray.init(address=...)``."""
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout: float = 180) -> "LocalRayCluster":
        """Start the head and return once its job API answers; on any failure or interrupt, stop what started."""
        with open(os.path.join(self.temp_dir, "ray-start.log"), "w") as log:  # the head keeps its own copy
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.time() + timeout
            while self.process.poll() is None:
                try:
                    urllib.request.urlopen(f"{self.address}/api/version", timeout=2).read()
                    return self
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"the Ray head did not answer within {timeout:.0f} s: {self._log_tail()}")
                    time.sleep(1)
            raise RuntimeError(f"ray start exited with {self.process.returncode}: {self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _log_tail(self) -> str:
        with open(os.path.join(self.temp_dir, "ray-start.log")) as fh:
            return fh.read()[-2000:]

    def stop(self) -> None:
        """SIGTERM to every process of the head's session, SIGKILL to what is left after 20 s; then the temp dir."""
        if self.process is not None:
            group = self.process.pid
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + grace
                while time.time() < deadline and group_alive(group):
                    self.process.poll()  # reap the head itself
                    time.sleep(0.2)
            self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def training_args(model: str, prompts: str, save: str, episodes: int, meds: bool = True) -> List[str]:
    """The arguments of a tiny CPU run: one step per episode over the same questions, a checkpoint every step."""
    args = [
        "--actor.model_name_or_path", model, "--reward.remote_url", REWARD_FUNC,
        "--data.prompt_dataset", prompts, "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.max_len", "128", "--rollout.max_new_tokens", "40", "--data.max_samples", str(len(QUESTIONS)),
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1", "--vllm.gpu_memory_utilization", "0.5",
        # CPU: no CUDA graphs, gloo weight sync, plain attention (flash-attention 2 has no CPU kernel).
        "--vllm.enforce_eager", "--vllm.sync_backend", "gloo", "--ds.attn_implementation", "sdpa",
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
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
    return args


def submit(cluster: LocalRayCluster, args: Sequence[str], log_path: str, on_line: Callable[[str], None] = print):
    """``ray job submit -- python -m openrlhf.cli.train_ppo_ray ARGS``; the job's output goes to ``log_path`` and
    each line to ``on_line``. Returns the exit code of ``ray job submit`` (non-zero when the job failed)."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", cluster.address,
        "--submission-id", f"meds-{uuid.uuid4().hex[:8]}", "--",
        sys.executable, "-m", "openrlhf.cli.train_ppo_ray", *args,
    ]  # fmt: skip
    with open(log_path, "a") as log, subprocess.Popen(
        command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as job:
        try:
            for line in job.stdout:
                log.write(line)
                on_line(line.rstrip("\n"))
        except BaseException:
            job.terminate()  # the job itself dies with the cluster
            raise
    return job.returncode


def scalars(tensorboard_dir: str, prefix: str = "") -> Dict[int, Dict[str, float]]:
    """Every scalar under ``tensorboard_dir`` whose tag starts with ``prefix``, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: Dict[int, Dict[str, float]] = {}
    for folder, _, files in os.walk(tensorboard_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        events = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith(prefix):
                for event in events.Scalars(tag):
                    steps.setdefault(event.step, {})[tag] = event.value
    return steps


class StepPrinter:
    """Prints each new step's ``train/meds/*`` values (polled from TensorBoard) and the job's MEDS lines."""

    SHOWN = ("penalty_mean", "penalty_max", "penalised_wrong_share", "stored_vectors", "clusters",
             "without_feature_share", "wrong_answers_distinct_per_question")  # fmt: skip

    def __init__(self, tensorboard_dir: str):
        # A resumed run appends to the same events: its earlier steps were printed by the earlier run.
        self.tensorboard_dir, self.printed, self.polled = tensorboard_dir, set(scalars(tensorboard_dir)), 0.0

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


def run_demo(steps: int = 6, save: Optional[str] = None, resume: Optional[str] = None) -> int:
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
            done = json.load(fh)["steps"]
    elif os.path.exists(os.path.join(save, "ckpt")):
        print(f"meds_patch demo: {save} already holds a run: use --resume {save}, or another --save", file=sys.stderr)
        return 2
    os.makedirs(save, exist_ok=True)
    print("preparing the tiny model (cached after the first time) ...", flush=True)
    model = prepared_model()
    prompts = write_prompts(os.path.join(save, "prompts.jsonl"), QUESTIONS)
    args = training_args(model, prompts, save, episodes=done + steps)
    cluster = LocalRayCluster(env=CPU_ENV)
    print(f"starting a local Ray cluster (2 declared GPUs, temp dir {cluster.temp_dir}) ...", flush=True)
    # SIGTERM ends the demo like Ctrl-C does: through the with-block, which stops the cluster.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with cluster:
        print(f"submitting train_ppo_ray --meds ({'resuming at step ' + str(done + 1) if resume else 'new run'}); "
              f"job log: {save}/job.log", flush=True)  # fmt: skip
        printer = StepPrinter(os.path.join(save, "tensorboard"))
        code = submit(cluster, args, os.path.join(save, "job.log"), printer)
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
        json.dump({"steps": done + steps}, fh)
    print(f"done in {time.time() - start:.0f} s: checkpoints in {save}/ckpt, TensorBoard events in {save}/tensorboard")
    print(f"continue with: python -m meds_patch demo --resume {save}")
    return 0
