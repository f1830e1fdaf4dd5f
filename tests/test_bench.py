"""The benchmark scripts keep working (quick mode); the figures themselves live in BENCHMARKS.md."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_controller_scaling_bench_prints_its_table():
    out = run("bench/controller_scaling.py", "--quick")
    assert "| critical path per step at 6 epochs |" in out and "Ray shards" in out


def test_feature_overhead_bench_prints_its_table():
    out = run("bench/feature_overhead.py", "--quick")
    assert all(variant in out for variant in ("plain", "hooks", "hidden_states"))


def test_answer_search_bench_prints_its_table():
    out = run("bench/answer_search.py", "--quick")
    assert "| 64 | box |" in out and "| 64 | no box |" in out


def test_reward_throughput_bench_prints_its_table():
    out = run("bench/reward_throughput.py", "--quick")
    assert "| one call per rollout (OpenRLHF) |" in out and "| one call for all |" in out
    assert "| False |" not in out  # the pool grades every answer as math-verify in the thread does


def test_data_iteration_bench_prints_its_table():
    out = run("bench/data_iteration.py", "--quick")
    assert "| row by row" in out and "| dataset_rows" in out


def test_collapse_ablation_quick_mode_writes_its_table_and_plot(tmp_path):
    # One seed, one episode of each arm through train_ppo_ray: the whole pipeline, not the result.
    out = run("bench/collapse_ablation.py", "--quick", "--results", str(tmp_path))
    assert "| pass@8 |" in out and "Median seconds per step" in out and "Decision (protocol)" in out
    assert (tmp_path / "collapse_ablation_quick.png").stat().st_size > 0
