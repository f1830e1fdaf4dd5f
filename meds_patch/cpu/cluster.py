"""Local Ray clusters for CPU runs of upstream's ``train_ppo_ray``: the harness that the demo, the tests and the
benches share.

``LocalRayCluster`` starts a cluster of its own (free ports, private temp dirs, declared GPUs), ``submit`` runs
``train_ppo_ray`` on it through ``ray job submit`` and stops a job whose actors died while starting, ``scalars``
reads what the run logged to TensorBoard. A cluster stops when its owner stops it, and also when the owner dies
without a word (a SIGKILL, a test's timeout): a watcher process of its own then stops it.
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

import psutil

import meds_patch.tools

# The reward file handed to OpenRLHF (which loads it by path): the package's own, so an installed wheel runs the
# demo without a checkout (examples/reward_func_math.py, the user-facing copy, re-exports the same function).
REWARD_FUNC = os.path.join(os.path.dirname(os.path.abspath(meds_patch.tools.__file__)), "reward_func_math.py")
# The engine's environment on CPU: a 1 GiB KV cache, and no pinning of OpenMP threads to cores that other
# processes of the run (and other jobs on the machine) also use.
CPU_ENV = {"MEDS_CPU_BACKEND": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# What train_ppo_ray needs on CPU: no CUDA graphs, gloo weight sync, plain attention (flash-attention 2 has no CPU
# kernel), and one vLLM engine on one declared GPU.
CPU_FLAGS = [
    "--vllm.enforce_eager", "--vllm.sync_backend", "gloo", "--ds.attn_implementation", "sdpa",
    "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1", "--vllm.gpu_memory_utilization", "0.5",
]  # fmt: skip


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


def start_time(pid: int) -> Optional[float]:
    """When the process started, or None once it is gone: a pid names the same process only while this stays the
    same (pids wrap around at 32768 here)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_tree(roots: Sequence[int]) -> List[int]:
    """The live processes below ``roots`` (roots included), and every process of the sessions they lead: a process
    that forked itself away from its parent (a daemon, a pool server) stays in its session."""
    children, sessions = {}, {}
    for process in psutil.process_iter(["ppid"]):
        with contextlib.suppress(OSError):
            sessions[process.pid] = os.getsid(process.pid)
            children.setdefault(process.info["ppid"], []).append(process.pid)
    found, todo = set(), [pid for pid in roots if pid in sessions]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(child for child in children.get(pid, []) if child not in found)
    # Sessions led by a root or a process below one (a session outlives its leader: a root may be gone)
    own_sessions = set(roots) | {sessions[pid] for pid in found if sessions[pid] in found}
    return sorted(found | {pid for pid, session in sessions.items() if session in own_sessions})


def stop_processes(roots: Dict[int, Optional[float]], grace: float = 10) -> None:
    """SIGTERM to the trees of ``roots`` ({pid: its start time}), SIGKILL to what is left after ``grace`` s.

    The trees are read again as the processes go: one may start another meanwhile (the job manager its driver).
    What was found stays a root, so a child that outlives its parent is still found; a pid whose start time
    changed is another process that got it since."""
    started = dict(roots)

    def ours() -> Set[int]:  # alive (a zombie too), and not a pid reused since
        return {pid for pid, t in started.items() if t is not None and start_time(pid) == t}

    for sig in (signal.SIGTERM, signal.SIGKILL):
        signalled, deadline = set(), time.time() + grace
        while True:
            for pid in process_tree(sorted(ours())):
                started.setdefault(pid, start_time(pid))
            for pid in ours() - signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                signalled.add(pid)
            if time.time() > deadline or all(zombie(pid) for pid in ours()):
                break
            time.sleep(0.2)


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
        self.watcher: Optional[subprocess.Popen] = None

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
        # The watcher learns each node's pid; should this process die before it says "stopped" (a SIGKILL, a
        # test's timeout), the watcher stops the nodes: they run in sessions of their own and would outlive us.
        self.watcher = subprocess.Popen(
            [sys.executable, "-m", "meds_patch.cpu.cluster", self.temp_dir, *self.node_temp_dirs],
            stdin=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.time() + timeout
            for node, command in enumerate(self.commands):
                with open(self._log(node), "w") as log:
                    self.processes.append(subprocess.Popen(
                        command, env=self.env if node == 0 else self.node_env, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ))  # fmt: skip
                self.watcher.stdin.write(f"{self.processes[-1].pid} {start_time(self.processes[-1].pid)!r}\n")
                self.watcher.stdin.flush()
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
        stop_processes({process.pid: start_time(process.pid) for process in self.processes})
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)  # reap the nodes' own ray start, our children
        self.processes = []
        for temp_dir in [self.temp_dir, *self.node_temp_dirs]:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if self.watcher is not None:
            with contextlib.suppress(OSError):
                self.watcher.communicate("stopped\n", timeout=30)
            self.watcher = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def actor_nodes(cluster: LocalRayCluster) -> Dict[str, List[str]]:
    """{actor class: the node address of each of its actors}, from Ray's state API."""
    from ray.util.state import list_actors, list_nodes

    ips = {node.node_id: node.node_ip for node in list_nodes(address=cluster.address)}
    placed: Dict[str, List[str]] = {}
    for actor in list_actors(address=cluster.address, limit=1000):  # those that have ended too
        placed.setdefault(actor.class_name, []).append(ips.get(actor.node_id, "?"))
    return {name: sorted(where) for name, where in sorted(placed.items())}


def stop_on_a_failed_start(
    cluster: LocalRayCluster, submission_id: Optional[str], done: threading.Event, found: List[str]
):
    """Every 10 s until ``done``: when an actor's creation task has failed, put its error in ``found`` and stop the
    job (``submission_id``; None: the one job of a cluster of our own). Upstream's driver does not hear of it: it
    waits for actors that wait for the dead one (a vLLM engine that could not load its reward function left the job
    silent for over 12 minutes)."""
    job_id = None  # Ray's id of the job, known once its driver runs; actors of earlier jobs are not this one's
    while not done.wait(10):
        from ray.util.state import list_actors, list_jobs  # once a job runs: ray takes seconds to import

        try:
            if job_id is None:
                filters = [("submission_id", "=", submission_id)] if submission_id else None
                jobs = [job for job in list_jobs(address=cluster.address, filters=filters, timeout=10) if job.job_id]
                if not jobs:
                    continue
                job_id, submission_id = jobs[0].job_id, jobs[0].submission_id
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
    """``ray job submit -- python -m openrlhf.cli.train_ppo_ray ARGS``: see ``run_job``."""
    submission_id = f"meds-{uuid.uuid4().hex[:8]}"
    command = [
        os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", cluster.address,
        "--submission-id", submission_id, "--", sys.executable, "-m", "openrlhf.cli.train_ppo_ray", *args,
    ]  # fmt: skip
    return run_job(cluster, command, log_path, on_line, submission_id)


def run_job(
    cluster: LocalRayCluster,
    command: Sequence[str],
    log_path: str,
    on_line: Callable[[str], None] = print,
    submission_id: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> int:
    """Run ``command``, which submits one job to ``cluster`` and follows it (``ray job submit``, or a recipe script
    that calls it; ``submission_id`` None: the cluster is ours and runs no other job). Its output goes to
    ``log_path`` and each line to ``on_line``. Returns its exit code (non-zero when the job failed). An actor that
    dies while starting stops the job, and its error ends the output."""
    done, failed_starts = threading.Event(), []
    watch = threading.Thread(
        target=stop_on_a_failed_start, args=(cluster, submission_id, done, failed_starts), daemon=True
    )
    with open(log_path, "a") as log, subprocess.Popen(
        command, env=env or cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
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


def scalar_events(tensorboard_dir: str, prefix: str = ""):
    """(tag, event) for every scalar event under ``tensorboard_dir`` whose tag starts with ``prefix``; an event has
    ``step``, ``value`` and ``wall_time``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder, _, files in os.walk(tensorboard_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        events = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith(prefix):
                yield from ((tag, event) for event in events.Scalars(tag))


def scalars(tensorboard_dir: str, prefix: str = "") -> Dict[int, Dict[str, float]]:
    """Every scalar under ``tensorboard_dir`` whose tag starts with ``prefix``, by step."""
    steps: Dict[int, Dict[str, float]] = {}
    for tag, event in scalar_events(tensorboard_dir, prefix):
        steps.setdefault(event.step, {})[tag] = event.value
    return steps


if __name__ == "__main__":
    # The watcher of a LocalRayCluster: "pid start-time" lines of its nodes on stdin. Input that ends without a
    # last "stopped" line means the owner died: stop the nodes' processes and remove the temp dirs (argv).
    roots, stopped = {}, False
    for line in sys.stdin:
        stopped = line.strip() == "stopped"
        if not stopped:
            pid, started = line.split()
            roots[int(pid)] = float(started)
    if not stopped:
        stop_processes(roots)
        for folder in sys.argv[1:]:
            shutil.rmtree(folder, ignore_errors=True)
