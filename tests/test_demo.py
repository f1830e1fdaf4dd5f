"""The demo's own parts: a private Ray cluster that coexists with others, and run folders it will not clobber."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from meds_patch.__main__ import main
from meds_patch.cpu.demo import LocalRayCluster, process_tree, zombie


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
