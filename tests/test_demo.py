"""The demo's own parts: a private Ray cluster that coexists with others, and run folders it will not clobber."""

import os
import urllib.request

from meds_patch.__main__ import main
from meds_patch.demo import LocalRayCluster, group_alive


def answers(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
        return True
    except OSError:
        return False


def test_a_second_cluster_ignores_ray_address_and_stops_only_itself(ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.gcs_address)
    cluster = LocalRayCluster(num_gpus=0, num_cpus=1).start()
    group, temp_dir = cluster.process.pid, cluster.temp_dir
    assert cluster.dashboard_port != ray_cluster.dashboard_port and answers(cluster.address)
    cluster.stop()
    assert not group_alive(group)  # no process of its session is left
    assert not os.path.exists(temp_dir) and not answers(cluster.address)
    assert answers(ray_cluster.address)


def test_demo_will_not_write_over_an_earlier_run(tmp_path, capsys):
    os.makedirs(tmp_path / "ckpt")
    assert main(["demo", "--save", str(tmp_path)]) == 2
    assert f"use --resume {tmp_path}" in capsys.readouterr().err


def test_demo_resumes_only_a_demo_run(tmp_path, capsys):
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert "holds no demo run to resume" in capsys.readouterr().err
