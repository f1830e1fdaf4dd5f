"""examples/scripts/train_meds_ray_slurm.sh, unchanged, under a real Slurm: ``scripts/local_slurm.sh start 2``
runs slurmctld and two slurmd nodes on this machine (n1 at 10.77.0.1 and n2 at 10.77.0.2, each in network, UTS,
mount and PID namespaces of its own) and every test submits the launcher with ``sbatch``. A Ray cluster started on
the host beforehand must outlive them all: ``ray stop``, which the launcher runs on every node, must not reach it.

One full training run; the failure, cancellation and time-limit tests submit a short recipe that fails, or waits
until it is stopped, once Ray runs on both nodes: what they test is the launcher."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster, start_time, zombie
from meds_patch.tools.report import find_memory_state

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "examples" / "scripts" / "train_meds_ray_slurm.sh"
LOCAL_SLURM = ROOT / "scripts" / "local_slurm.sh"
STATE = Path("/var/lib/meds-local-slurm")  # local_slurm.sh's default LOCAL_SLURM_DIR
NODE_ADDRESSES = ("10.77.0.1", "10.77.0.2")
BRIDGE, CONF, MARK = "meds-slurm0", Path("/etc/slurm/slurm.conf"), "# written by scripts/local_slurm.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm needs root (namespaces, slurmd)")

# A recipe for the launcher tests: Ray runs on both nodes when symmetric-run starts it on the head.
WAITING_RECIPE = """#!/usr/bin/env bash
env -u RAY_ADDRESS python3 -c "import ray; ray.init(address='auto'); print('recipe: Ray nodes', sum(n['Alive'] for n in ray.nodes()))"
touch "$RECIPE_STARTED"
{action}
"""


@pytest.fixture(scope="module")
def bystander():
    """A Ray cluster on the host, as another user's or the suite's own would be; its processes, by start time."""
    with LocalRayCluster(env=CPU_ENV) as cluster:
        yield cluster, {pid: start_time(pid) for pid in cluster.own_processes()}


def local_slurm(*args, check=True, **env) -> subprocess.CompletedProcess:
    """scripts/local_slurm.sh with ``args``, ``env`` added to the environment; its output, stdout and stderr apart."""
    environment = {**os.environ, **{k: str(v) for k, v in env.items()}}
    result = subprocess.run(
        ["bash", str(LOCAL_SLURM), *args], env=environment, capture_output=True, text=True, timeout=600
    )
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def local_slurm_module(bystander):
    # A cluster left behind by an interrupted run of these tests goes first (stop ends only what its start began).
    local_slurm("stop")
    try:
        yield
    finally:
        local_slurm("stop")


@pytest.fixture
def slurm(local_slurm_module):
    """A local Slurm of two nodes: started by the first test that needs it, and again only after a test stopped it,
    so that the tests pass in any order."""
    if not (STATE / "pids").exists():
        local_slurm("start", "2")


@pytest.fixture
def no_slurm(local_slurm_module):
    """No local Slurm runs (the module's is stopped; the next test that needs it starts it again)."""
    local_slurm("stop")


def ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat, the start time that local_slurm.sh records, counted after the command name."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def start_time_or_none(pid: int):
    try:
        return ticks(pid)
    except (OSError, IndexError):
        return None


def netns_pids(name: str) -> list:
    """The processes in the network namespace ``name`` (ip netns add's)."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def node_processes() -> dict:
    """{PID namespace of a node: the command lines of its processes but those local_slurm.sh started}."""
    namespaces = (STATE / "pid-namespaces").read_text().split()
    daemons = {line.split()[0] for line in (STATE / "pids").read_text().splitlines()}
    found = {ns: [] for ns in namespaces}
    for proc in Path("/proc").iterdir():
        try:
            ns = os.readlink(proc / "ns" / "pid")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if ns in found and proc.name not in daemons and not zombie(int(proc.name)):
            found[ns].append(command)
    return found


def wait_until_empty(timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while any(node_processes().values()) and time.time() < deadline:
        time.sleep(1)
    return node_processes()


def sbatch(tmp_path, *options, recipe=None, wait=True, **env):
    """Submit the launcher from the repository root with the CPU .venv; returns (sbatch's process, output file).
    ``recipe``: the text of a recipe to run instead of the CPU recipe (a copy of the repository's scripts folder
    holds it, as REPO_DIR)."""
    environment = {**os.environ, "MEDS_CPU": "1", "ENV_SETUP": f"source {ROOT}/.venv/bin/activate", **env}
    if recipe is not None:
        repo = tmp_path / "repo"
        (repo / "examples" / "scripts").mkdir(parents=True)
        (repo / "examples" / "scripts" / "recipe.sh").write_text(recipe)
        environment.update(REPO_DIR=str(repo), RECIPE="recipe.sh", RECIPE_STARTED=str(tmp_path / "started"))
    output = tmp_path / "slurm.out"
    command = ["sbatch", "--parsable", f"--output={output}", *(["--wait"] if wait else []), *options, str(LAUNCHER)]
    job = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, text=True)
    return job, output


def job_id(job) -> str:
    return job.stdout.readline().strip().split(";")[0]


def queued(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())


def scontrol_job(job: str) -> str:
    """The controller's record of a job, on one line (kept for MinJobAge, 300 s, after it ends)."""
    return subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True).stdout


def wait_for(path: Path, job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and queued(job), f"the recipe did not start in {timeout} s"
        time.sleep(1)


def test_start_refuses_a_state_directory_that_it_did_not_make(tmp_path):
    # LOCAL_SLURM_DIR=$HOME: start used to `rm -rf` it. The refusal comes first, whether a local Slurm runs or not.
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    result = local_slurm("start", "1", check=False, LOCAL_SLURM_DIR=home)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{home} exists, is not an empty directory and was not made by this script" in result.stderr
    assert [p.name for p in home.iterdir()] == ["notes.txt"] and (home / "notes.txt").read_text() == "mine"


def test_start_times_are_read_after_a_command_name_with_spaces_and_parentheses(tmp_path):
    # A process's command name is its executable's file name: "(sleep (a) b)" is three fields to awk, and an
    # unbalanced parenthesis is legal too. local_slurm.sh sourced defines its functions and runs nothing.
    name = tmp_path / "sleep (a) b"
    name.symlink_to(shutil.which("sleep"))
    process = subprocess.Popen([str(name), "300"])
    state = tmp_path / "state"
    state.mkdir()

    def script(code: str) -> str:
        command = ["bash", "-c", f'source "$SCRIPT" && {code}']
        environment = {**os.environ, "SCRIPT": str(LOCAL_SLURM), "LOCAL_SLURM_DIR": str(state)}
        environment["PID"] = str(process.pid)
        return subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout

    try:
        deadline = time.time() + 10
        while Path(f"/proc/{process.pid}/comm").read_text() != "sleep (a) b\n":  # until it has run the executable
            assert time.time() < deadline, Path(f"/proc/{process.pid}/comm").read_text()
            time.sleep(0.1)
        script('record "$PID"')
        assert (state / "pids").read_text() == f"{process.pid} {ticks(process.pid)}\n"
        start = str(ticks(process.pid))
        check = f'alive "$PID" {start} && echo alive || echo gone'
        assert script(f"{check}; alive \"$PID\" $(({start} + 1)) || echo other") == "alive\nother\n"
        process.kill()  # not waited for: a zombie, which is gone to the script
        deadline = time.time() + 10
        while state_of(process.pid) != "Z" and time.time() < deadline:
            time.sleep(0.1)
        assert state_of(process.pid) == "Z"
        assert script(check) == "gone\n" and script('start_time "$PID"') == ""
    finally:
        process.kill()
        process.wait()


def test_two_nodes_train_meds_under_sbatch_and_the_checkpoint_holds_the_memory(slurm, tmp_path):
    job, output = sbatch(tmp_path, "-N", "2", SAVE_DIR=str(tmp_path / "run"))
    assert job.wait(timeout=1200) == 0, output.read_text()
    log = output.read_text()
    placed = {name: where.split(", ") for name, where in re.findall(r"^  (\w+): (.+)$", log, re.M)}
    # Two declared GPUs a node hold the vLLM engine and the two policy ranks, wherever Ray puts them: each node gets
    # one or two of them. The memory's shards are spread, one a node.
    assert len(placed["PolicyModelActor"]) == 2 and len(placed["RolloutRayActor"]) == 1, log
    assert set(placed["PolicyModelActor"] + placed["RolloutRayActor"]) == set(NODE_ADDRESSES), log
    assert sorted(placed["MemoryShard"]) == list(NODE_ADDRESSES), log
    state, _ = find_memory_state(str(tmp_path / "run" / "ckpt"))
    assert len(state["keys"]) == 4 and sum(len(v) for v in state["vectors"]) > 0
    assert "stopping Ray on all 2 nodes" in log and "finished with status 0" in log
    assert wait_until_empty() == {ns: [] for ns in node_processes()}


def test_a_failing_recipe_fails_the_job_with_its_exit_status_and_says_why(slurm, tmp_path):
    recipe = WAITING_RECIPE.format(action='echo "recipe: giving up on purpose" >&2; exit 3')
    job, output = sbatch(tmp_path, "-N", "2", recipe=recipe)
    assert job.wait(timeout=600) == 3
    log = output.read_text()
    assert "recipe: Ray nodes 2" in log and "recipe: giving up on purpose" in log
    assert "finished with status 3" in log
    assert wait_until_empty() == {ns: [] for ns in node_processes()}


def test_scancel_during_the_run_stops_ray_on_both_nodes_and_leaves_no_process(slurm, tmp_path):
    job, output = sbatch(tmp_path, "-N", "2", recipe=WAITING_RECIPE.format(action="sleep 600"), wait=False)
    jid = job_id(job)
    wait_for(tmp_path / "started", jid)
    running = node_processes()
    assert all(any("raylet" in c for c in commands) for commands in running.values()), running
    subprocess.run(["scancel", jid], check=True)
    deadline = time.time() + 120
    while queued(jid) and time.time() < deadline:
        time.sleep(1)
    assert not queued(jid)
    assert wait_until_empty() == {ns: [] for ns in node_processes()}, output.read_text()


def test_the_time_limit_signal_runs_the_trap_and_the_job_ends_cleanly(slurm, tmp_path):
    # --time is in minutes; Slurm sends the --signal up to a minute early, so within 0-60 s of the start here.
    options = ("-N", "2", "--time=2", "--signal=B:TERM@60")
    job, output = sbatch(tmp_path, *options, recipe=WAITING_RECIPE.format(action="sleep 600"), wait=False)
    jid = job_id(job)
    wait_for(tmp_path / "started", jid)
    deadline = time.time() + 240
    while queued(jid) and time.time() < deadline:
        time.sleep(1)
    log = output.read_text()
    assert not queued(jid), log
    assert "stopping Ray on all 2 nodes" in log and "finished with status 143" in log
    # The trap ended the job (exit 143, 128 + SIGTERM) before its time limit: Slurm did not have to.
    job = dict(field.split("=", 1) for field in scontrol_job(jid).split() if "=" in field)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "143:0", job
    assert wait_until_empty() == {ns: [] for ns in node_processes()}


def test_stop_ends_what_start_started_and_the_ray_cluster_beside_runs_on(slurm, bystander):
    cluster, processes = bystander
    daemons = [line.split() for line in (STATE / "pids").read_text().splitlines()]
    assert (STATE / ".made-by-local_slurm.sh").is_file()  # start's mark: the one directory it will remove
    local_slurm("stop")
    # Ended: gone, or a zombie left for this machine's init to reap (the daemons' parent exited long ago).
    assert all(start_time_or_none(int(pid)) != int(start) or zombie(int(pid)) for pid, start in daemons)
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("meds-n")
    assert not Path("/etc/slurm/slurm.conf").exists()
    assert {pid: start_time(pid) for pid in processes} == processes  # every one alive, none restarted
    assert cluster.alive_nodes() == 1


def test_stop_cleans_up_after_a_start_that_failed_before_recording_a_pid(no_slurm, tmp_path):
    # What such a start leaves (munged was already running, so nothing recorded): the bridge, the config, a node's
    # network namespace with its PID namespace and a process in them. Its EXIT trap has only stop to clean up.
    if CONF.exists():
        pytest.skip(f"{CONF} is not local_slurm.sh's: this machine has a Slurm of its own")
    state = tmp_path / "state"  # never made: the start failed before it recorded anything there
    made, node_process = [], None  # what the stop under test did not clean up goes at the end
    try:
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        made.append("bridge")
        subprocess.run(["ip", "netns", "add", "meds-n1"], check=True)
        made.append("netns")
        CONF.parent.mkdir(exist_ok=True)
        CONF.write_text(f"{MARK} (a local test cluster)\nStateSaveLocation={state}/ctld\n")
        node_process = subprocess.Popen(
            ["nsenter", "--net=/var/run/netns/meds-n1", "unshare", "--pid", "--fork", "--mount-proc", "sleep", "300"]
        )
        deadline = time.time() + 10
        while len(netns_pids("meds-n1")) < 2:  # unshare, and sleep, the first process of its PID namespace
            assert time.time() < deadline, "the node's process did not start"
            time.sleep(0.1)
        node = {pid: ticks(pid) for pid in netns_pids("meds-n1")}

        result = local_slurm("stop", LOCAL_SLURM_DIR=state)
        assert "stopped" in result.stdout, result.stdout + result.stderr
        assert all(start_time_or_none(pid) != start or zombie(pid) for pid, start in node.items())
        assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
        assert "meds-n" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not CONF.exists()
        # Idempotent: nothing left, and stop says so.
        again = local_slurm("stop", LOCAL_SLURM_DIR=state)
        assert again.stdout == "local_slurm.sh: no local Slurm cluster is running\n", again.stdout + again.stderr
        assert not state.exists()
    finally:
        if "netns" in made and Path("/var/run/netns/meds-n1").exists():
            for pid in netns_pids("meds-n1"):
                os.kill(pid, 9)
            subprocess.run(["ip", "netns", "del", "meds-n1"], check=True)
        if node_process is not None:
            node_process.kill()
            node_process.wait(timeout=60)
        if "bridge" in made:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        if CONF.exists() and CONF.read_text().startswith(MARK):
            CONF.unlink()
