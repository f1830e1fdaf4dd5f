"""Upstream's real entry point end to end on CPU: ``ray job submit -- python -m openrlhf.cli.train_ppo_ray`` with
vLLM rollouts, the math reward function, DeepSpeed steps, weight sync and checkpoints, on the session's Ray cluster
and the prepared tiny model. Each run costs about a minute, so one run serves the tests that read it."""

import math
import os
import time

import pytest

from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster, scalars, submit
from meds_patch.cpu.demo import QUESTIONS, training_args
from meds_patch.cpu.tiny_math import prepared_model, tiny_tokenizer, write_prompts
from meds_patch.tools.report import find_memory_state

# A learning rate that moves the tiny policy visibly within a step, for the weight-sync check.
WEIGHT_SYNC_ARGS = ["--actor.adam.lr", "1e-3", "--algo.advantage.is_correction_level", "token"]


class Run:
    def __init__(self, folder, lines):
        self.folder, self.log = folder, "\n".join(lines)

    def scalars(self, prefix=""):
        return scalars(os.path.join(self.folder, "tensorboard"), prefix)

    def series(self, tag):
        return [values[tag] for _, values in sorted(self.scalars(tag).items())]


def train(cluster, folder, episodes, *extra, meds=True, nodes=1, succeed=True):
    os.makedirs(folder, exist_ok=True)
    prompts = write_prompts(os.path.join(folder, "prompts.jsonl"), QUESTIONS)
    args = training_args(prepared_model(), prompts, folder, episodes, meds=meds, nodes=nodes) + list(extra)
    lines = []
    code = submit(cluster, args, os.path.join(folder, "job.log"), lines.append)
    assert (code == 0) == succeed, "\n".join(lines[-60:])
    return Run(folder, lines)


@pytest.fixture(scope="module")
def sync_run(ray_cluster, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sync"))
    eval_args = ["--eval.dataset", os.path.join(folder, "prompts.jsonl"), "--eval.steps", "1",
                 "--eval.n_samples_per_prompt", "4", "--eval.temperature", "1.0"]  # fmt: skip
    return train(ray_cluster, folder, 3, *WEIGHT_SYNC_ARGS, *eval_args)


def test_sync_run_lowers_rewards_of_recurring_wrong_answers(sync_run):
    penalties = sync_run.series("train/meds/penalty_mean")
    assert len(penalties) == 3 and penalties[0] == 0.0  # a question's first visit has no history
    assert max(penalties[1:]) > 0
    # The prepared model writes \boxed{} (at lr 1e-3 the policy may drift away from it within the run: a rollout
    # without an answer position takes no penalty).
    assert sync_run.series("train/meds/without_feature_share")[0] < 0.5


def test_every_step_with_a_history_logs_whether_the_clusters_track_answers(sync_run):
    diagnosed = sync_run.series("train/meds/diagnosed_wrong_rollouts")
    assert len(diagnosed) == 2 and min(diagnosed) > 0  # steps 2 and 3 met the memories of step 1
    assert all(0 <= share <= 1 for share in sync_run.series("train/meds/noise_vote_share"))
    assert all(-1 <= rho <= 1 for rho in sync_run.series("train/meds/cluster_answer_rank_correlation"))


def test_the_spectral_concentration_of_the_rollouts_is_logged_where_they_have_features(sync_run):
    # 4 layer logits a rollout: the largest of 4 eigenvalues that sum to 1 is at least 1/4. At lr 1e-3 the policy
    # may stop writing \boxed{} within the run: a step where no question keeps two rollouts with a feature logs none.
    steps = sync_run.scalars("train/meds/")
    ratios = {
        step: v["train/meds/top1_eigen_ratio"] for step, v in steps.items() if "train/meds/top1_eigen_ratio" in v
    }
    assert 1 in ratios and all(0.25 - 1e-6 <= ratio <= 1 + 1e-6 for ratio in ratios.values())
    assert all(steps[step]["train/meds/without_feature_share"] > 0.5 for step in set(steps) - set(ratios))


def test_a_successful_run_prints_no_traceback(sync_run):
    # Its output includes every actor's, to their exit (once, two resource-tracker KeyErrors at the vLLM actor's).
    assert "Traceback" not in sync_run.log


def test_sync_run_saves_the_memory_in_its_checkpoint(sync_run):
    state, _ = find_memory_state(os.path.join(sync_run.folder, "ckpt"))
    assert len(set(state["keys"])) == len(QUESTIONS)
    assert sum(len(v) for v in state["vectors"]) == sync_run.series("train/meds/stored_vectors")[-1]


def test_evaluation_logs_unbiased_pass_at_k(sync_run):
    evaluated = sync_run.scalars("eval/")
    assert evaluated and all(
        {"eval/eval_unbiased_pass@1", "eval/eval_unbiased_pass@4"} <= set(v) for v in evaluated.values()
    )
    for values in evaluated.values():
        assert 0 <= values["eval/eval_unbiased_pass@1"] <= values["eval/eval_unbiased_pass@4"] <= 1


def test_weight_sync_keeps_vllm_on_the_trained_policy(sync_run):
    # vllm_kl: mean gap between vLLM's rollout log-probs and the actor's, after the policy moved at lr 1e-3.
    gaps = sync_run.series("train/vllm_kl")
    assert len(gaps) == 3 and max(abs(g) for g in gaps) < 0.02, gaps


def test_dropping_the_synced_weights_lets_vllm_drift(tmp_path):
    # The same run on a cluster whose vLLM receives the weights but does not load them. The gap grows with every
    # step the policy moves away from vLLM's (0.06 after one step, 0.13 after two in one run): five steps.
    with LocalRayCluster(env={**CPU_ENV, "MEDS_CPU_DROP_WEIGHT_SYNC": "1"}) as cluster:
        run = train(cluster, str(tmp_path), 5, *WEIGHT_SYNC_ARGS, meds=False)
    gaps = run.series("train/vllm_kl")
    assert abs(gaps[0]) < 0.02 and max(abs(g) for g in gaps[1:]) > 0.1, gaps


def test_resume_through_ray_job_submit_restores_the_memory(ray_cluster, sync_run):
    saved_state, _ = find_memory_state(os.path.join(sync_run.folder, "ckpt"))
    saved_vectors = sum(len(v) for v in saved_state["vectors"])
    resumed = train(ray_cluster, sync_run.folder, 4, *WEIGHT_SYNC_ARGS)
    assert f"MEDS: restored {{'memories': {len(QUESTIONS)}, 'vectors': {saved_vectors}" in resumed.log
    stored = resumed.scalars("train/meds/stored_vectors")
    assert sorted(stored) == [1, 2, 3, 4]  # step 4 added to the first run's events
    assert stored[4]["train/meds/stored_vectors"] >= saved_vectors


def test_the_answer_memory_penalises_recurring_wrong_answers_and_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    folder = str(tmp_path)
    first = train(ray_cluster, folder, 2, "--algo.meds.feature", "answer")
    assert first.series("train/meds/penalty_mean")[0] == 0.0 and first.series("train/meds/penalty_mean")[1] > 0
    assert first.series("train/meds/without_feature_share") == [0.0, 0.0]  # every rollout has an answer
    state, _ = find_memory_state(os.path.join(folder, "ckpt"))
    assert state["kind"] == "answer" and len(state["keys"]) == len(set(state["keys"])) > 0
    saved = sum(sum(counts.values()) for counts in state["answers"])
    assert saved == first.series("train/meds/stored_vectors")[-1]
    resumed = train(ray_cluster, folder, 3, "--algo.meds.feature", "answer")
    assert f"MEDS: restored {{'memories': {len(state['keys'])}, 'vectors': {saved}," in resumed.log
    assert resumed.series("train/meds/stored_vectors")[-1] > saved


@pytest.fixture(scope="module")
def async_run(ray_cluster, tmp_path_factory):
    # The same run carries the entropy-advantage baseline, which acts in the policy update only, after everything
    # MEDS does; the overlong penalty (responses of 10 to 40 tokens lose up to 1) makes every group's rewards differ,
    # so advantages are not 0 even when the tiny model gets a question always right or always wrong.
    entropy_advantage = ["--algo.entropy_advantage.enable", "--reward.overlong_buffer_len", "30",
                         "--reward.overlong_penalty_factor", "1.0"]  # fmt: skip
    return train(ray_cluster, str(tmp_path_factory.mktemp("async")), 2, "--train.async_enable", *entropy_advantage)


def test_async_trainer_applies_meds(async_run):
    assert len(async_run.series("train/meds/penalty_mean")) == 2
    assert async_run.series("train/meds/stored_vectors")[-1] > 0


def test_an_actor_that_dies_while_starting_ends_the_run_with_its_error(ray_cluster, tmp_path):
    # Upstream's driver waits on without hearing of it; the harness stops the job (it was silent 12 min before).
    started = time.time()
    run = train(ray_cluster, str(tmp_path), 2, "--reward.remote_url", str(tmp_path / "missing.py"), succeed=False)
    assert time.time() - started < 240  # not a hang
    assert "the job was stopped: RolloutRayActor" in run.log and "died while starting" in run.log
    assert f"No such file or directory: '{tmp_path / 'missing.py'}'" in run.log.rsplit("the job was stopped", 1)[1]


def test_the_entropy_advantage_shapes_the_policy_update_without_an_entropy_loss(async_run):
    # No entropy bonus was asked for, yet the actor computes the entropy. Each token's bonus min(0.4 H_t, |A_t| / 2)
    # is at most 0.4 ln(vocabulary): a mean bonus of 0 would mean no shaping, one above that bound a wrong formula.
    bonus = async_run.series("train/entropy_advantage_bonus")
    assert len(bonus) == 2 and all(0 < b <= 0.4 * math.log(len(tiny_tokenizer())) for b in bonus)
    assert len(async_run.series("train/entropy_loss")) == 2


def test_without_meds_the_run_is_upstream(ray_cluster, tmp_path):
    run = train(ray_cluster, str(tmp_path), 2, meds=False)
    logged = {tag for values in run.scalars().values() for tag in values}
    assert "train/reward" in logged and not any("meds" in tag for tag in logged)
    with pytest.raises(FileNotFoundError, match="no MEDS error memory"):
        find_memory_state(os.path.join(run.folder, "ckpt"))
