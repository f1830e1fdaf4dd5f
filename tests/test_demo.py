"""The demo's own parts: a private Ray cluster that coexists with others, and run folders it will not clobber."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from meds_patch.__main__ import main
from meds_patch.cpu.cluster import LocalRayCluster, process_tree, start_time, zombie


def answers(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
        return True
    except OSError:
        return False


def test_a_second_cluster_of_two_nodes_ignores_ray_address_and_stops_only_itself(ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.gcs_address)
    cluster = LocalRayCluster(num_gpus=0, num_cpus=1, nodes=2, node_gpus=0).start()
    processes, temp_dir = cluster.own_processes(), cluster.temp_dir
    node_ips = [cmdline(str(p.pid)).split("--node-ip-address\0")[1].split("\0")[0] for p in cluster.processes]
    assert node_ips == ["127.0.0.1", "127.0.0.2"]
    assert cluster.dashboard_port != ray_cluster.dashboard_port and answers(cluster.address)
    assert not set(processes) & set(ray_cluster.own_processes())
    cluster.stop()
    # every process of both nodes is gone (a zombie is: it waits for init, which this machine's reaps late)
    assert not [pid for pid in processes if os.path.exists(f"/proc/{pid}") and not zombie(pid)]
    assert not os.path.exists(temp_dir) and not answers(cluster.address)
    assert answers(ray_cluster.address)


def test_a_cluster_whose_owner_is_killed_stops_by_itself(tmp_path):
    # The owner is SIGKILLed, as a test's timeout does to a bench: it cannot stop anything itself.
    owner = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from meds_patch.cpu.cluster import LocalRayCluster\n"
        "cluster = LocalRayCluster(num_gpus=0, num_cpus=1).start()\n"
        "print(cluster.temp_dir, *cluster.own_processes(), flush=True)\n"
        "time.sleep(600)\n"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    temp_dir, *pids = owner.stdout.readline().split()
    started = {int(pid): start_time(int(pid)) for pid in pids}
    assert len(started) > 3  # ray start, GCS, raylet, dashboard, ...
    owner.kill()
    owner.wait()
    deadline = time.time() + 60
    while time.time() < deadline and [p for p, t in started.items() if start_time(p) == t and not zombie(p)]:
        time.sleep(1)
    assert not [p for p, t in started.items() if start_time(p) == t and not zombie(p)]
    assert not os.path.exists(temp_dir)


def test_process_tree_holds_a_daemon_that_left_its_parent_and_nothing_of_the_callers(tmp_path):
    # The child forks a sleeper and exits: the sleeper's parent is then init, but it stays in the child's session.
    script = "sleep 60 & echo $! > daemon; exit 0"
    child = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, start_new_session=True)
    try:
        child.wait(timeout=10)
        daemon = int((tmp_path / "daemon").read_text())
        time.sleep(0.2)
        assert process_tree([child.pid]) == [daemon]  # the child itself is gone
        assert os.getpid() not in process_tree([daemon]) and 1 not in process_tree([daemon])
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_process_tree_of_a_process_in_the_callers_session_is_its_subtree_only():
    sleeper = subprocess.Popen(["sleep", "60"])  # our session, whose leader is not below the sleeper
    try:
        assert process_tree([sleeper.pid]) == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_demo_will_not_write_over_an_earlier_run(tmp_path, capsys):
    os.makedirs(tmp_path / "ckpt")
    assert main(["demo", "--save", str(tmp_path)]) == 2
    assert f"use --resume {tmp_path}" in capsys.readouterr().err


def test_demo_resumes_only_a_demo_run(tmp_path, capsys):
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert "holds no demo run to resume" in capsys.readouterr().err


def test_a_resumed_demo_keeps_its_nodes(tmp_path, capsys):
    (tmp_path / "demo.json").write_text('{"steps": 2, "nodes": 2, "alpha": 0.0}')
    assert main(["demo", "--resume", str(tmp_path), "--nodes", "1"]) == 2
    assert "was trained on 2 node(s): resume it without --nodes, or with --nodes 2" in capsys.readouterr().err


# A cluster that is not there: the demo says what it submits, then the submission fails at once. The resumed α's
# effect on training is checked in test_multinode.py (the two-node demo).
NO_CLUSTER = "http://127.0.0.1:1"


def test_a_resumed_demo_keeps_its_alpha(tmp_path, capsys):
    (tmp_path / "demo.json").write_text('{"steps": 2, "nodes": 1, "alpha": 0.0}')
    assert main(["demo", "--resume", str(tmp_path), "--address", NO_CLUSTER]) == 1
    out = capsys.readouterr().out
    assert "submitting train_ppo_ray --meds (resuming at step 3, alpha 0.0)" in out and "replaces" not in out


def test_an_alpha_given_to_a_resumed_demo_replaces_its_own_and_says_so(tmp_path, capsys):
    (tmp_path / "demo.json").write_text('{"steps": 2, "nodes": 1, "alpha": 0.0}')
    assert main(["demo", "--resume", str(tmp_path), "--alpha", "0.1", "--address", NO_CLUSTER]) == 1
    out = capsys.readouterr().out
    assert "--alpha 0.1 replaces the run's 0.0 from step 3" in out and "(resuming at step 3, alpha 0.1)" in out


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_demo_stops_its_cluster(tmp_path, stop):
    demo = subprocess.Popen(
        [sys.executable, "-m", "meds_patch", "demo", "--save", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    temp_dir = None
    for line in demo.stdout:
        if line.startswith("starting a local Ray cluster"):
            temp_dir = line.split("temp dir ")[1].split(")")[0]
        if line.startswith("submitting"):
            break
    os.killpg(demo.pid, stop)  # a terminal's Ctrl-C reaches the whole foreground group
    stopped = time.time()
    demo.communicate(timeout=120)
    assert time.time() - stopped < 60  # it returns once the cluster is stopped (SIGKILL 10 s after SIGTERM)
    assert temp_dir and not os.path.exists(temp_dir)
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and temp_dir in cmdline(pid)]
    # the job's driver too (Ray's job manager starts it in a session of its own): its arguments name the run folder
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path) in cmdline(pid)]


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
