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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Set

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


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


def start_time(pid: int) -> Optional[int]:
    """When the process started (clock ticks since boot), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(roots: Sequence[int]) -> List[int]:
    """The live processes below ``roots`` (roots included), and every process of the sessions they lead: a process
    that forked itself away from its parent (a daemon, a pool server) stays in its session."""
    children, sessions = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        sessions[int(entry)] = int(fields[3])
    found, todo = set(), [pid for pid in roots if pid in sessions]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(child for child in children.get(pid, []) if child not in found)
    # Sessions led by a root or a process below one (a session outlives its leader: a root may be gone)
    own_sessions = set(roots) | {sessions[pid] for pid in found if sessions[pid] in found}
    return sorted(found | {pid for pid, session in sessions.items() if session in own_sessions})


class LocalRayCluster:
    """A Ray cluster of our own on this machine: a head (``ray start --head --block`` at 127.0.0.1) and, with
    ``nodes`` > 1, worker nodes at 127.0.0.2, 127.0.0.3, ... (``ray start --address ... --block``), each in a
    session of its own. Every port is picked free and the temp dir is private, so it coexists with other clusters
    and ignores ``RAY_ADDRESS``. ``stop`` ends every process the nodes started, the job drivers that Ray's job
    manager runs in sessions of their own included, and nothing else."""

    def __init__(
        self,
        num_gpus: int = 2,
        num_cpus: int = 8,
        env: Optional[Dict[str, str]] = None,
        nodes: int = 1,
        node_gpus: int = 1,
        node_env: Optional[Dict[str, str]] = None,
    ):
        self.temp_dir = tempfile.mkdtemp(prefix="meds-ray-", dir="/tmp")  # short: Ray's socket paths live in it
        node_flags = [
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
        ]
        head_flags = ["--port", "--dashboard-port", "--ray-client-server-port", *node_flags]  # fmt: skip
        ports = iter(free_ports(len(head_flags) + (nodes - 1) * len(node_flags)))
        head_ports = {flag: next(ports) for flag in head_flags}
        self.gcs_port, self.dashboard_port = head_ports["--port"], head_ports["--dashboard-port"]
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        common = ["--block", "--num-cpus", str(num_cpus), "--object-store-memory", str(1 << 30),
                  "--disable-usage-stats"]  # fmt: skip
        self.commands = [[
            ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--temp-dir", self.temp_dir, "--num-gpus", str(num_gpus), *common,
            *[str(x) for item in head_ports.items() for x in item],
        ]]  # fmt: skip
        # Each node has a temp dir of its own, as on separate machines: nodes sharing one session folder would each
        # forward every worker's log lines to the driver, so the job's output would show them twice.
        self.node_temp_dirs = [tempfile.mkdtemp(prefix=f"meds-ray-n{node}-", dir="/tmp") for node in range(1, nodes)]
        for node, node_temp_dir in enumerate(self.node_temp_dirs, start=1):
            self.commands.append([
                ray, "start", "--address", self.gcs_address, "--node-ip-address", f"127.0.0.{node + 1}",
                "--temp-dir", node_temp_dir,
                "--num-gpus", str(node_gpus), *common, *[str(x) for flag in node_flags for x in (flag, next(ports))],
            ])  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # On two busy cores the dashboard's modules can take longer than Ray's default 30 s to come up.
        self.env["RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT"] = "180"
        self.env.update(env or {})
        self.node_env = {**self.env, **(node_env or {})}  # the worker nodes' (e.g. one without the import hook)
        self.processes: List[subprocess.Popen] = []

    @property
    def address(self) -> str:
        """The job API (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """For ``ray.init(address=...)`` and ``ray start --address``."""
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout: float = 180) -> "LocalRayCluster":
        """Start the nodes and return once every one is alive in the cluster; on any failure or interrupt, stop
        what started."""
        try:
            deadline = time.time() + timeout
            for node, command in enumerate(self.commands):
                with open(self._log(node), "w") as log:
                    self.processes.append(subprocess.Popen(
                        command, env=self.env if node == 0 else self.node_env, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ))  # fmt: skip
                while self.alive_nodes() <= node:
                    for i, process in enumerate(self.processes):
                        if process.poll() is not None:
                            raise RuntimeError(f"ray start of node {i} exited with {process.returncode}: "
                                               f"{self._log_tail(i)}")  # fmt: skip
                    if time.time() > deadline:
                        raise RuntimeError(f"node {node} did not join within {timeout:.0f} s: {self._log_tail(node)}")
                    time.sleep(1)
            return self
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> int:
        """Live nodes as the job API reports them (0 while it does not answer yet)."""
        try:
            with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as answer:
                summary = json.load(answer)["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(node["raylet"]["state"] == "ALIVE" for node in summary)

    def _log(self, node: int) -> str:
        return os.path.join(self.temp_dir, f"ray-start-{node}.log")

    def _log_tail(self, node: int) -> str:
        with open(self._log(node), errors="replace") as fh:
            return fh.read()[-2000:]

    def own_processes(self) -> List[int]:
        """Every process the nodes started, the job drivers that Ray's job manager runs in sessions of their own
        included."""
        return process_tree([process.pid for process in self.processes])

    def kill_node(self, node: int) -> None:
        """SIGKILL every process of one worker node at once, as when its machine dies."""
        for pid in process_tree([self.processes[node].pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.processes[node].wait()

    def stop(self) -> None:
        """SIGTERM to every process the nodes started, SIGKILL to what is left after 10 s; then the temp dirs."""
        # The tree is read again as the processes go: one may start another meanwhile (the job manager its driver).
        # What was found stays a root, so a child that outlives its parent is still found; a root whose start time
        # changed is another process that got a pid of ours (pids wrap at 32768 here).
        started = {pid: start_time(pid) for pid in self.own_processes()}

        def ours() -> Set[int]:  # alive (a zombie too), and not a pid reused since
            return {pid for pid, t in started.items() if t is not None and start_time(pid) == t}

        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            signalled, deadline = set(), time.time() + grace
            while True:
                for pid in process_tree([process.pid for process in self.processes] + sorted(ours())):
                    started.setdefault(pid, start_time(pid))
                for pid in ours() - signalled:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    signalled.add(pid)
                if time.time() > deadline or all(zombie(pid) for pid in ours()):
                    break
                time.sleep(0.2)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)  # reap the nodes' own ray start, our children
        self.processes = []
        for temp_dir in [self.temp_dir, *self.node_temp_dirs]:
            shutil.rmtree(temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def training_args(model: str, prompts: str, save: str, episodes: int, meds: bool = True, nodes: int = 1) -> List[str]:
    """The arguments of a tiny CPU run: one step per episode over the same questions, a checkpoint every step;
    with ``nodes`` > 1, one policy rank per node and a memory sharded over that many actors."""
    args = [
        "--actor.model_name_or_path", model, "--reward.remote_url", REWARD_FUNC,
        "--data.prompt_dataset", prompts, "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.max_len", "128", "--rollout.max_new_tokens", "40", "--data.max_samples", str(len(QUESTIONS)),
        "--actor.num_nodes", str(nodes), "--actor.num_gpus_per_node", "1",
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
        if nodes > 1:
            args += ["--algo.meds.num_workers", str(nodes)]
    return args


def actor_nodes(cluster: LocalRayCluster) -> Dict[str, List[str]]:
    """{actor class: the node address of each of its actors}, from Ray's state API."""
    from ray.util.state import list_actors, list_nodes

    ips = {node.node_id: node.node_ip for node in list_nodes(address=cluster.address)}
    placed: Dict[str, List[str]] = {}
    for actor in list_actors(address=cluster.address, limit=1000):  # those that have ended too
        placed.setdefault(actor.class_name, []).append(ips.get(actor.node_id, "?"))
    return {name: sorted(where) for name, where in sorted(placed.items())}


def stop_on_a_failed_start(cluster: LocalRayCluster, submission_id: str, done: threading.Event, found: List[str]):
    """Every 10 s until ``done``: when an actor's creation task has failed, put its error in ``found`` and stop the
    job. Upstream's driver does not hear of it: it waits for actors that wait for the dead one (a vLLM engine that
    could not load its reward function left the job silent for over 12 minutes)."""
    job_id = None  # Ray's id of the job, known once its driver runs; actors of earlier jobs are not this one's
    while not done.wait(10):
        from ray.util.state import list_actors, list_jobs  # once a job runs: ray takes seconds to import

        try:
            if job_id is None:
                jobs = list_jobs(address=cluster.address, filters=[("submission_id", "=", submission_id)], timeout=10)
                job_id = jobs[0].job_id if jobs else None
                if job_id is None:
                    continue
            filters = [("state", "=", "DEAD"), ("job_id", "=", job_id)]
            dead = list_actors(address=cluster.address, filters=filters, detail=True, limit=1000, timeout=10)
        except Exception:  # the state API can be slow to answer on a busy machine: ask again next time
            continue
        for actor in dead:
            failure = (actor.death_cause or {}).get("creation_task_failure_context")
            if failure:
                error = failure.get("formatted_exception_string", "").strip() or json.dumps(failure)[:2000]
                found.append(f"{actor.class_name} (pid {actor.pid}) died while starting:\n{error}")
                ray = os.path.join(os.path.dirname(sys.executable), "ray")
                stop = [ray, "job", "stop", "--address", cluster.address, "--no-wait", submission_id]
                subprocess.run(stop, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                return


def submit(cluster: LocalRayCluster, args: Sequence[str], log_path: str, on_line: Callable[[str], None] = print):
    """``ray job submit -- python -m openrlhf.cli.train_ppo_ray ARGS``; the job's output goes to ``log_path`` and
    each line to ``on_line``. Returns the exit code of ``ray job submit`` (non-zero when the job failed). An actor
    that dies while starting stops the job, and its error ends the output."""
    submission_id = f"meds-{uuid.uuid4().hex[:8]}"
    command = [
        os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", cluster.address,
        "--submission-id", submission_id, "--", sys.executable, "-m", "openrlhf.cli.train_ppo_ray", *args,
    ]  # fmt: skip
    done, failed_starts = threading.Event(), []
    watch = threading.Thread(
        target=stop_on_a_failed_start, args=(cluster, submission_id, done, failed_starts), daemon=True
    )
    with open(log_path, "a") as log, subprocess.Popen(
        command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as job:
        watch.start()
        try:
            for line in job.stdout:
                log.write(line)
                on_line(line.rstrip("\n"))
        except BaseException:  # Ctrl-C: return at once; the job itself dies with the cluster
            done.set()
            job.kill()
            raise
        done.set()
        watch.join()
        for failure in failed_starts:
            for line in f"meds_patch demo: the job was stopped: {failure}".splitlines():
                log.write(line + "\n")
                on_line(line)
    return job.returncode or (1 if failed_starts else 0)


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
    nodes: int = 1,
    address: Optional[str] = None,
    alpha: Optional[float] = None,
) -> int:
    """Train the tiny model for ``steps`` through ``ray job submit``, on a local Ray cluster of ``nodes`` started
    and stopped here, or on the running cluster whose job API is ``address`` (the CPU recipe under Slurm)."""
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
        done, nodes = state["steps"], state.get("nodes", 1)  # a run goes on with the ranks it was saved with
    elif os.path.exists(os.path.join(save, "ckpt")):
        print(f"meds_patch demo: {save} already holds a run: use --resume {save}, or another --save", file=sys.stderr)
        return 2
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
        print(f"submitting train_ppo_ray --meds ({'resuming at step ' + str(done + 1) if resume else 'new run'}); "
              f"job log: {save}/job.log", flush=True)  # fmt: skip
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
        json.dump({"steps": done + steps, "nodes": nodes}, fh)
    print(f"done in {time.time() - start:.0f} s: checkpoints in {save}/ckpt, TensorBoard events in {save}/tensorboard")
    print(f"continue with: python -m meds_patch demo --resume {save}")
    return 0
