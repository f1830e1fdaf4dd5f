"""examples/scripts/train_meds_ray_slurm.sh, dry-run: stand-ins for ``srun``, ``ray``, ``hostname`` and ``python3``
first on PATH log every command the script would issue, on which (stand-in) node and with which environment.

The ``srun`` stand-in runs its command once per node of a two-node allocation, one after the other, with
STUB_NODE naming the node; ``ray symmetric-run`` runs the entrypoint after ``--`` on the node that owns the
``--address`` host, as Ray's does, so the real recipe runs on the head and its ``ray job submit`` is logged too.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "scripts" / "train_meds_ray_slurm.sh"
NODES = ["gpu-a", "gpu-b"]
IPS = {"gpu-a": "10.0.0.1", "gpu-b": "10.0.0.2"}  # gpu-a runs the batch script: the Ray head
SECRET = "0123456789abcdef0123456789abcdef01234567"

LOG = """
def log():
    node = os.environ.get("STUB_NODE", "gpu-a")
    env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "WANDB_API_KEY", "ENV_APPLIED")}
    row = dict(prog=os.path.basename(sys.argv[0]), node=node, argv=sys.argv[1:], env=env)
    with open(os.environ["STUB_LOG"], "a") as fh:
        fh.write(json.dumps(row) + "\\n")
"""
STUBS = {
    "srun": """
args = sys.argv[1:]
log()
command = args[next(i for i, a in enumerate(args) if not a.startswith("-")) :]
count = next((int(a.split("=")[1]) for a in args if a.startswith("--nodes=")), 1)
child = None

def forward(signum, frame):  # srun passes SIGTERM on to its tasks
    if child is not None:
        child.terminate()
        child.wait()
    sys.exit(143)

signal.signal(signal.SIGTERM, forward)
status = 0
for node in json.loads(os.environ["STUB_NODES"])[:count]:
    child = subprocess.Popen(command, env=dict(os.environ, STUB_NODE=node))
    status = max(status, child.wait())
sys.exit(status)
""",
    "hostname": """
log()
node = os.environ.get("STUB_NODE", "gpu-a")
if "--ip-address" in sys.argv:
    print(os.environ.get("STUB_HEAD_IP") or json.loads(os.environ["STUB_IPS"])[node])
else:
    print(node)
""",
    "python3": """
log()
sys.exit(int(os.environ.get("STUB_CUDA_RC", "0")))
""",
    "ray": """
args = sys.argv[1:]
if args[:1] == ["symmetric-run"]:
    log()
    address = args[args.index("--address") + 1]
    mine = json.loads(os.environ["STUB_IPS"])[os.environ["STUB_NODE"]]
    if address.split(":")[0] != mine or os.environ.get("STUB_RAY_START_FAILS"):
        sys.exit(0)  # a worker joins and returns; a failed `ray start` is reported and exits 0, as Ray's does
    sys.exit(subprocess.run(args[args.index("--") + 1 :]).returncode)
if args[:2] == ["job", "submit"]:
    log()
    if os.environ.get("STUB_JOB_STARTED"):
        open(os.environ["STUB_JOB_STARTED"], "w").close()
        time.sleep(60)  # a long job, until the test signals the batch script
    sys.exit(int(os.environ.get("STUB_JOB_RC", "0")))
log()
""",
}


@pytest.fixture
def stubs(tmp_path):
    # The launcher runs `ray stop --force` on every node; on the dry run's PATH only the stand-in may answer to
    # `ray`, or it would end every Ray cluster on this machine.
    real = shutil.which("ray", path=f"/usr/bin{os.pathsep}/bin")
    assert real is None, f"{real} is on the dry run's PATH: its `ray stop --force` would reach every Ray here"
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in STUBS.items():
        header = f"#!{sys.executable}\nimport json, os, signal, subprocess, sys, time\n{LOG}\n"
        (folder / name).write_text(header + body)
        (folder / name).chmod(0o755)
    return folder


def start(tmp_path, stubs, **env):
    """Start the batch script as sbatch would on gpu-a, in its own process group (the test ends leftovers)."""
    environment = {
        "PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path / "home"),
        "STUB_LOG": str(tmp_path / "calls.jsonl"),
        "STUB_NODES": json.dumps(NODES),
        "STUB_IPS": json.dumps(IPS),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": str(len(NODES)),
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "ENV_SETUP": "export ENV_APPLIED=1",
        **env,
    }
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.Popen(
        ["bash", str(SLURM)], env=environment, cwd=tmp_path, start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(proc, timeout=60):
    """Wait for the script, end whatever it left running (stand-ins its trap did not reach), return its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate()


def calls(tmp_path, prog=None, first=None):
    path = tmp_path / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if (prog is None or r["prog"] == prog) and (first is None or r["argv"][:1] == [first])]


def run(tmp_path, stubs, **env):
    proc = start(tmp_path, stubs, **env)
    out, err = finish(proc)
    return proc.returncode, out, err


def option(argv, name):
    """The value of ``name`` in ``argv``, written ``name value`` or ``name=value``."""
    if name in argv:
        return argv[argv.index(name) + 1]
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


# ── Before any Ray ──


def test_env_setup_is_required(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, ENV_SETUP=None)
    assert status == 2 and "ENV_SETUP is not set" in err and "CPU" in err
    assert calls(tmp_path) == []


def test_a_node_without_cuda_stops_the_job_before_ray_starts(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, STUB_CUDA_RC="1")
    assert status == 3 and "no Python with CUDA on gpu-a" in err
    assert calls(tmp_path, "ray") == []


def test_every_node_checks_cuda_in_the_environment_env_setup_makes(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs)
    assert status == 0, err
    checks = calls(tmp_path, "python3")
    assert [c["node"] for c in checks] == NODES and all(c["env"]["ENV_APPLIED"] == "1" for c in checks)


def test_outside_a_slurm_job_the_script_refuses(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, SLURM_JOB_ID=None)
    assert status == 2 and "sbatch" in err and calls(tmp_path) == []


def test_a_head_address_on_loopback_is_refused_for_several_nodes(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, STUB_HEAD_IP="127.0.1.1")
    assert status == 2 and "HEAD_IP" in err and calls(tmp_path, "srun") == []


def test_cpu_mode_must_be_0_or_1(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, MEDS_CPU="yes")
    assert status == 2 and "MEDS_CPU must be 0 or 1" in err and calls(tmp_path) == []


def test_cpu_mode_skips_the_cuda_check_declares_cpu_resources_and_runs_the_tiny_recipe(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, MEDS_CPU="1", SAVE_DIR=str(tmp_path / "run"))
    assert status == 0, err
    (python,) = calls(tmp_path, "python3")  # the CPU recipe's, and no CUDA probe
    assert python["argv"][:3] == ["-m", "meds_patch", "demo"] and python["node"] == "gpu-a"
    assert option(python["argv"], "--nodes") == "2" and option(python["argv"], "--save") == str(tmp_path / "run")
    assert option(python["argv"], "--address") == "http://127.0.0.1:8265"
    for start_call in calls(tmp_path, "ray", "symmetric-run"):
        assert option(start_call["argv"], "--num-gpus") == "2" and option(start_call["argv"], "--num-cpus") == "8"


# ── Ray start-up and the recipe ──


def test_ray_starts_on_every_node_with_the_head_on_this_one(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs)
    assert status == 0, err
    starts = calls(tmp_path, "ray", "symmetric-run")
    assert [s["node"] for s in starts] == NODES
    for start_call in starts:
        argv = start_call["argv"]
        assert option(argv, "--address") == f"{IPS['gpu-a']}:6379" and option(argv, "--min-nodes") == "2"
        assert option(argv, "--num-gpus") == "8"  # from SLURM_GPUS_PER_NODE=h100:8


def test_ray_dashboard_listens_on_localhost_only(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs)
    assert status == 0, err
    for start_call in calls(tmp_path, "ray", "symmetric-run"):
        assert option(start_call["argv"], "--dashboard-host") == "127.0.0.1"


def test_the_recipe_submits_once_to_the_local_dashboard_from_the_head(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, RAY_ADDRESS="http://elsewhere:8265")
    assert status == 0, err
    (submit,) = calls(tmp_path, "ray", "job")
    assert submit["node"] == "gpu-a" and option(submit["argv"], "--address") == "http://127.0.0.1:8265"
    trainer = submit["argv"][submit["argv"].index("--") + 1 :]
    assert option(trainer, "--actor.num_nodes") == "2" and option(trainer, "--actor.num_gpus_per_node") == "8"


def test_a_ray_address_in_the_callers_environment_does_not_reach_ray_start(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, RAY_ADDRESS="http://elsewhere:8265")
    assert status == 0, err
    assert all(s["env"]["RAY_ADDRESS"] is None for s in calls(tmp_path, "ray", "symmetric-run"))


def test_the_wandb_key_reaches_ray_through_the_environment_only(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, WANDB_API_KEY=SECRET)
    assert status == 0, err
    everything = calls(tmp_path)
    assert everything and not any(SECRET in word for c in everything for word in c["argv"])
    # `ray start` on every node has it, so every Ray worker (the one that logs to wandb included) inherits it.
    assert all(s["env"]["WANDB_API_KEY"] == SECRET for s in calls(tmp_path, "ray", "symmetric-run"))


# ── Clean-up ──


def ray_stops(tmp_path):
    return [c["node"] for c in calls(tmp_path, "ray", "stop") if c["argv"] == ["stop", "--force"]]


def test_a_failed_job_fails_the_slurm_job_and_stops_ray_on_every_node(tmp_path, stubs):
    status, _, _ = run(tmp_path, stubs, STUB_JOB_RC="1")
    assert status == 1
    assert ray_stops(tmp_path) == NODES
    order = [c["argv"][0] for c in calls(tmp_path, "ray")]
    assert order.index("stop") > order.index("job")


def test_a_finished_job_stops_ray_on_every_node_too(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs)
    assert status == 0, err
    assert ray_stops(tmp_path) == NODES


def test_ray_that_never_started_the_recipe_fails_the_job(tmp_path, stubs):
    status, _, err = run(tmp_path, stubs, STUB_RAY_START_FAILS="1")
    assert status == 1 and "the recipe never ran" in err
    assert calls(tmp_path, "ray", "job") == [] and ray_stops(tmp_path) == NODES


def test_scancel_stops_ray_on_every_node(tmp_path, stubs):
    started = tmp_path / "job-started"
    proc = start(tmp_path, stubs, STUB_JOB_STARTED=str(started))
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # scancel, or --signal=B:TERM@300 near the time limit
    finally:
        finish(proc)
    assert proc.returncode == 143
    assert ray_stops(tmp_path) == NODES
