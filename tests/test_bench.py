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


def test_collapse_experiment_quick_mode_evaluates_before_and_after_training(tmp_path):
    # One episode of the control arm through train_ppo_ray, with the offline vLLM evaluations around it, and the
    # report: the pipeline, not the result.
    out = run("bench/collapse_experiment.py", "--quick", "--results", str(tmp_path))
    assert "| step 0 (offline) |" in out and "| end (offline) |" in out
    assert "| final pass@16 |" in out and "Gates: control collapsed:" in out
    assert (tmp_path / "collapse_experiment_quick.json").stat().st_size > 0
    assert (tmp_path / "collapse_experiment_quick.png").stat().st_size > 0


def test_an_arm_beats_another_by_the_minimum_effect_and_two_standard_errors():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from collapse_experiment import beats

    control = [0.5, 0.5, 0.5]
    assert beats([0.6, 0.6, 0.6], control)  # +0.10, no spread
    assert not beats([0.54, 0.54, 0.54], control)  # +0.04 < 0.05, however steady
    # +0.10, but the standard error is sqrt(0.04 / 3) = 0.115: twice it is more than the difference
    assert not beats([0.4, 0.6, 0.8], control)
    assert not beats(control, [0.6, 0.6, 0.6])


def test_a_dapo_run_without_evaluation_or_filtering_passes_none_of_their_flags():
    # step_overhead's runs: the same work every step, and no evaluation between the timed steps.
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from dapo_runs import dapo_args

    full = dapo_args("MODEL", "/work/run", seed=0, episodes=1, run_name="t", alpha=0.1, eval_steps=5)
    plain = dapo_args("MODEL", "/work/run", seed=0, episodes=1, run_name="t", dynamic_filtering=False)
    assert {"--eval.steps", "--algo.dynamic_filtering_enable", "--meds"} <= set(full)
    assert not [a for a in plain if a.startswith(("--eval.", "--algo.dynamic_filtering", "--meds", "--algo.meds."))]


def test_step_intervals_leave_out_the_steps_next_to_an_evaluation():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from dapo_runs import step_intervals

    logged_at = {1: 0.0, 2: 1.0, 3: 3.0, 4: 6.0, 5: 10.0, 7: 20.0}  # step 6 not logged: 5 -> 7 is no interval
    assert step_intervals(logged_at) == [1.0, 2.0, 3.0, 4.0]
    assert step_intervals(logged_at, eval_steps=3) == [1.0, 4.0]  # 2 -> 3 and 3 -> 4 touch the evaluation at 3


def test_step_overhead_charges_py_spy_samples_to_the_memory_parts(tmp_path):
    # The whole bench takes about 20 minutes (BENCHMARKS.md); here its attribution, on real py-spy samples of a
    # process that runs ErrorMemory updates: the critical-path update and the background re-clustering.
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from step_overhead import RATE, charge

    workload = (
        "import numpy as np, time\n"
        "from meds_patch import ErrorMemory\n"
        "memory, rng, end = ErrorMemory(), np.random.default_rng(0), time.time() + 8\n"
        "while time.time() < end:\n"
        "    memory.update([str(i % 4) for i in range(64)], np.zeros(64, bool), rng.random((64, 14)))\n"
    )
    job = subprocess.Popen([sys.executable, "-c", workload])
    raw = tmp_path / "samples.txt"
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    subprocess.run([py_spy, "record", "-p", str(job.pid), "-r", str(RATE), "--format", "raw", "-o", str(raw),
                    "--nonblocking", "--duration", "5"], check=True, capture_output=True, timeout=60)  # fmt: skip
    job.wait(timeout=60)
    samples = charge(str(raw))
    assert samples["memory update (critical path)"] > 0 and samples["re-clustering (background thread)"] > 0
    assert not {"answer search (actor)", "final answers for metrics"} & set(samples)
