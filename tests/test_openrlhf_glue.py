"""The patched OpenRLHF path on CPU: flags, the actor's feature capture, penalties before baselines, checkpoints."""

import importlib.util
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from meds_patch import find_answer_positions, layer_logit_features
from meds_patch.core.memory import prompt_key
from meds_patch.cpu.tiny_math import tiny_tokenizer
from meds_patch.integration.glue import RolloutValues
from meds_patch.integration.hook import upstream_root
from tests.inprocess import build, generate_rollouts, parse_train_args, train_steps

BASE_ARGS = ["--reward.remote_url", "rule", "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "2",
             "--rollout.micro_batch_size", "8", "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1"]  # fmt: skip
MEDS_ARGS = ["--meds", "--algo.meds.num_layers", "4", "--algo.advantage.estimator", "group_norm", *BASE_ARGS]


# ── Flags ──


def test_meds_flags_parse_into_the_algo_namespace():
    args = parse_train_args([*MEDS_ARGS, "--algo.meds.alpha", "0.02", "--algo.meds.noise_as_cluster", "false"])
    assert args.algo.meds.enable is True
    assert (args.algo.meds.alpha, args.algo.meds.beta, args.algo.meds.num_layers) == (0.02, None, 4)
    assert args.algo.meds.noise_as_cluster is False and args.algo.meds.anchor == "\\boxed{"


def test_meds_is_off_by_default():
    assert parse_train_args(BASE_ARGS).algo.meds.enable is False


def test_meds_options_without_meds_are_rejected():
    with pytest.raises(ValueError, match="--algo.meds.alpha given without --meds"):
        parse_train_args([*BASE_ARGS, "--algo.meds.alpha", "0.2"])


@pytest.mark.parametrize(
    "flag, value",
    [("--algo.meds.num_workers", "2"), ("--algo.meds.anchor", "ANSWER:"), ("--algo.meds.anchor_search", "text")],
)
def test_glue_options_without_meds_are_rejected(flag, value):
    with pytest.raises(ValueError, match=f"{flag} given without --meds"):
        parse_train_args([*BASE_ARGS, flag, value])


def test_invalid_meds_values_name_the_flag():
    with pytest.raises(ValueError, match=r"--algo\.meds\.alpha=-1\.0 is invalid"):
        parse_train_args([*MEDS_ARGS, "--algo.meds.alpha", "-1"])


def test_meds_needs_a_correctness_source():
    args = [a for a in MEDS_ARGS if a not in ("--reward.remote_url", "rule")]
    with pytest.raises(ValueError, match="correctness source"):
        parse_train_args(args)


def test_the_answer_memory_in_the_controller_cannot_be_sharded():
    with pytest.raises(ValueError, match="--algo.meds.feature answer keeps a count per answer in the controller"):
        parse_train_args([*MEDS_ARGS, "--algo.meds.feature", "answer", "--algo.meds.num_workers", "2"])


def test_an_unknown_feature_is_rejected_by_the_flag():
    with pytest.raises(SystemExit):
        parse_train_args([*MEDS_ARGS, "--algo.meds.feature", "hidden_states"])


# ── Actor rank: features from the experience forward ──


@pytest.fixture(scope="module")
def batch(tmp_path_factory, local_ray):
    run = build(MEDS_ARGS, str(tmp_path_factory.mktemp("ckpt")))
    samples = generate_rollouts(run, [(1, 2), (3, 4)], torch.Generator().manual_seed(0))
    from openrlhf.trainer.ppo_utils.experience import Experience

    # Make one row end without an answer, and pad rows to different lengths as the experience maker does.
    samples[1].sequences = samples[1].sequences[:, :-6]
    samples[1].attention_mask, samples[1].action_mask = (
        samples[1].attention_mask[:, :-6],
        samples[1].action_mask[:, :-6],
    )
    return run, Experience.concat_experiences(samples, run.tokenizer.pad_token_id)


def expected_features(run, batch):
    prompt_len = batch.sequences.shape[1] - batch.action_mask.shape[1] + batch.action_mask.long().argmax(1)
    positions = find_answer_positions(batch.sequences, prompt_len, run.tokenizer, attention_mask=batch.attention_mask)
    model = run.policy.actor.model
    return layer_logit_features(model, batch.sequences, batch.attention_mask, positions, num_layers=4), positions


def forward_both_ways(run, exp, packed: bool):
    """PolicyModelActor.forward with MEDS on, then off, in the padded or packed layout."""
    run.args.ds.packing_samples = run.policy.actor.packing_samples = packed
    try:
        log_probs, features = run.policy.forward(exp.sequences, exp.action_mask, exp.attention_mask)
        run.args.algo.meds.enable = False
        plain_log_probs = run.policy.forward(exp.sequences, exp.action_mask, exp.attention_mask)
    finally:
        run.args.algo.meds.enable, run.args.ds.packing_samples = True, False
        run.policy.actor.packing_samples = False
    assert all(len(b._forward_hooks) == 0 for b in run.policy.actor.model.model.layers)
    torch.testing.assert_close(log_probs, plain_log_probs)  # capturing changes nothing upstream computes
    return features


def test_actor_forward_returns_the_core_features_for_padded_batches(batch):
    run, exp = batch
    features = forward_both_ways(run, exp, packed=False)
    expected, positions = expected_features(run, exp)
    assert positions[1] == -1 and (positions[[0] + list(range(2, len(positions)))] >= 0).all()
    torch.testing.assert_close(features, expected, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_a_row_without_response_tokens_has_no_feature(batch):
    # Its prompt asks for \boxed{}: with no response the row must not read the prompt's anchor.
    run, exp = batch
    action_mask = exp.action_mask.clone()
    action_mask[0] = False
    _, features = run.policy.forward(exp.sequences, action_mask, exp.attention_mask)
    assert torch.isnan(features[0]).all() and torch.isfinite(features[2]).all()


def test_anchor_search_text_reaches_the_actor_forward(batch):
    # Row 0's response becomes "\boxed{1} is \boxed{3}": only the text search reads the 3.
    run, exp = batch
    tok = run.tokenizer
    start = exp.sequences.shape[1] - exp.action_mask.shape[1] + int(exp.action_mask[0].long().argmax())
    first, between, last = (tok.encode(t, add_special_tokens=False) for t in ("\\boxed{1}", " is \\boxed{", "3}"))
    response = first + between + last
    sequences, attention_mask = exp.sequences.clone(), exp.attention_mask.clone()
    sequences[0, start:] = tok.pad_token_id
    sequences[0, start : start + len(response)] = torch.tensor(response)
    attention_mask[0, start + len(response) :] = 0
    run.args.algo.meds.anchor_search = "text"
    try:
        _, features = run.policy.forward(sequences, exp.action_mask, attention_mask)
    finally:
        run.args.algo.meds.anchor_search = "tokens"
    positions = torch.full((len(sequences),), -1)
    positions[0] = start + len(first) + len(between) - 1
    expected = layer_logit_features(run.policy.actor.model, sequences, attention_mask, positions, num_layers=4)
    torch.testing.assert_close(features[0], expected[0], rtol=1e-5, atol=1e-5)


def test_log_probs_without_features_say_the_hook_is_missing_on_that_node():
    from meds_patch.integration.glue import attach_features

    samples = [SimpleNamespace(), SimpleNamespace()]
    with pytest.raises(RuntimeError, match="import hook on its node is not active"):
        attach_features(samples, [torch.zeros(2, 5), torch.zeros(2, 5)])  # B = 2 would unpack as a pair


def test_actor_forward_reads_the_answer_token_of_each_packed_sequence(batch):
    # The reference is the padded batch read row by row (layer_logit_features: row * length + position), a route
    # that shares nothing with the packed index. transformers keeps packed sequences apart by their position ids
    # (block-diagonal masks), so each row's hidden states are the padded forward's, up to float error.
    run, exp = batch
    config = run.policy.actor.model.config
    use_cache, config.use_cache = config.use_cache, False  # as upstream's Actor loads a model: transformers reads
    try:  # packed position ids only without a cache
        features = forward_both_ways(run, exp, packed=True)
    finally:
        config.use_cache = use_cache
    expected, positions = expected_features(run, exp)
    assert positions[1] == -1 and torch.isnan(features[1]).all()
    torch.testing.assert_close(features, expected, equal_nan=True, rtol=1e-4, atol=1e-4)
    # Rows that differ: a packed index one row off would not pass.
    assert (expected[0] - expected[2]).abs().max() > 1e-2


# ── Controller: penalties land on rewards before every baseline ──


def load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def makers():
    """(patched, pristine) experience-maker modules: the pristine one is upstream's file loaded past the hook."""
    import openrlhf.trainer.ppo_utils.experience_maker as patched

    path = os.path.join(upstream_root(), "openrlhf/trainer/ppo_utils/experience_maker.py")
    return patched, load_module("_pristine_experience_maker", path)


def maker_for(module, estimator, meds: bool):
    from meds_patch.core.config import MEDSConfig
    from meds_patch.integration.glue import TrainerOptions

    maker = module.RemoteExperienceMaker.__new__(module.RemoteExperienceMaker)
    maker.advantage_estimator = estimator
    maker.kl_ctl = SimpleNamespace(value=0.0)
    meds_ns = SimpleNamespace(enable=meds, **vars(MEDSConfig(num_layers=2)), **vars(TrainerOptions()))
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=4),
        reward=SimpleNamespace(clip_range=(-10, 10)),
        algo=SimpleNamespace(
            advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=0.95, no_std_norm=True), meds=meds_ns
        ),
    )
    maker.strategy, maker.args, maker.tokenizer = SimpleNamespace(args=args), args, tiny_tokenizer()
    return maker


def experiences(rewards, scores, features=None):
    from openrlhf.trainer.ppo_utils.experience import Experience

    answers = torch.tensor([tiny_tokenizer().encode(f"so \\boxed{{{i % 2}}}") for i in range(4)])
    exp = Experience(
        index=[0, 1, 2, 3], rewards=torch.tensor(rewards), scores=torch.tensor(scores),
        sequences=answers, attention_mask=torch.ones_like(answers),
        action_mask=torch.ones(4, 3), kl=torch.zeros(4, 3), values=torch.zeros(4, 3),
        prompts=["What is 1 + 1?"] * 4, info={"reward": torch.tensor(rewards)},
    )  # fmt: skip
    if features is not None:
        exp.meds = RolloutValues(features=torch.tensor(features, dtype=torch.float32))
    return [exp]


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "rloo", "reinforce_baseline", "gae"])
def test_penalties_reach_rewards_before_the_baseline(makers, estimator):
    patched, pristine = makers
    maker = maker_for(patched, estimator, meds=True)
    # History: three wrong answers of this question in one cluster along e0.
    maker.meds_state = None
    from meds_patch.integration.glue import controller_state

    controller_state(maker).memory.load_state_dict(
        {"version": 1, "config": {}, "keys": [prompt_key("What is 1 + 1?")], "correct": [False],
         "vectors": [np.array([[1, 0], [1, 0.01], [1, 0.02]], np.float32)], "labels": [np.array([0, 0, 0])]}
    )  # fmt: skip
    rewards, scores = [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]
    features = [[0, 1], [0, 1], [1, 0.005], [float("nan")] * 2]  # the last wrong rollout has no answer position
    result = maker.compute_advantages_and_returns(experiences(rewards, scores, features))[0]

    p = 0.1 * math.log(3 + 1)
    reference = pristine_result = maker_for(pristine, estimator, meds=False)
    pristine_result = reference.compute_advantages_and_returns(experiences([1.0, 1.0, -p, 0.0], scores))[0]
    torch.testing.assert_close(result.advantages, pristine_result.advantages)
    torch.testing.assert_close(result.returns, pristine_result.returns)
    torch.testing.assert_close(result.info["meds_penalty"], torch.tensor([0.0, 0.0, p, 0.0]))
    torch.testing.assert_close(result.scores, torch.tensor(scores))  # the dynamic-filter signal is untouched
    assert not hasattr(result, "meds")


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "rloo", "reinforce_baseline", "gae", "reinforce"])
def test_without_meds_the_patched_maker_equals_upstream(makers, estimator):
    patched, pristine = makers
    rewards, scores = [1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]
    ours = maker_for(patched, estimator, meds=False).compute_advantages_and_returns(experiences(rewards, scores))[0]
    theirs = maker_for(pristine, estimator, meds=False).compute_advantages_and_returns(experiences(rewards, scores))[0]
    for field in ("rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=0, atol=0)
    assert ours.info.keys() == theirs.info.keys()


def test_correctness_falls_back_to_rewards_without_scores(makers):
    patched, _ = makers
    maker = maker_for(patched, "group_norm", meds=True)
    exps = experiences([1.0, 0.2, 0.0, 0.0], [0, 0, 0, 0], [[1, 0]] * 4)
    exps[0].scores = None
    maker.compute_advantages_and_returns(exps)
    assert maker.meds_state.last_step.wrong == 3  # 0.2 < correct_threshold 0.5


def test_a_correct_but_overlong_rollout_counts_as_correct(makers):
    # docs/ALGORITHM.md §2: correctness is the reward before shaping. A reward model's 1.0 that DAPO's overlong buffer
    # lowers to 0.0 (length 4 exceeds 4 - 2 by the whole buffer: penalty -1) is still a correct answer.
    patched, _ = makers
    maker = maker_for(patched, "group_norm", meds=True)
    maker.args.reward.overlong_buffer_len, maker.args.reward.overlong_penalty_factor = 2, 1.0
    maker.args.rollout.max_new_tokens = 4
    exps = experiences([1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0], [[1, 0]] * 4)
    exps[0].scores, exps[0].response_length = None, torch.tensor([4, 1, 1, 1])
    result = maker.compute_advantages_and_returns(exps)[0]
    assert result.info["reward"][0] == 0.0  # the length penalty did land
    assert maker.meds_state.last_step.wrong == 2


def test_the_answer_memory_penalises_a_recurring_wrong_answer_with_no_layer_features(makers):
    patched, pristine = makers
    maker = maker_for(patched, "group_norm", meds=True)
    maker.args.algo.meds.feature = "answer"
    from meds_patch.integration.glue import controller_state, finish_capture, start_capture

    policy = SimpleNamespace(strategy=SimpleNamespace(args=maker.args))
    assert finish_capture(policy, start_capture(policy, None, None, None)) is None  # no hooks, no layers read
    key = prompt_key("What is 1 + 1?")
    controller_state(maker).memory.load_state_dict(
        {"version": 1, "kind": "answer", "keys": [key], "correct": [False], "answers": [{"0": 2, "1": 1}]}
    )
    # Rollouts answer 0, 1, 0, 1 (experiences()); the two wrong ones answered 0 (seen twice) and 1 (seen once).
    rewards = [0.0, 0.0, 1.0, 1.0]
    exps = experiences(rewards, rewards)
    exps[0].meds = RolloutValues(features=None)  # what the actor returns when the memory keeps answers
    result = maker.compute_advantages_and_returns(exps)[0]
    expected = torch.tensor([0.1 * math.log(3), 0.1 * math.log(2), 0.0, 0.0])
    torch.testing.assert_close(result.info["meds_penalty"], expected)
    reference = maker_for(pristine, "group_norm", meds=False)
    shaped = reference.compute_advantages_and_returns(experiences((-expected).tolist()[:2] + [1.0, 1.0], rewards))
    torch.testing.assert_close(result.advantages, shaped[0].advantages)
    assert maker.meds_state.last_step.without_feature == 0  # every rollout has an answer


def test_step_records_how_varied_the_wrong_answers_are(makers):
    patched, _ = makers
    maker = maker_for(patched, "group_norm", meds=True)
    maker.compute_advantages_and_returns(experiences([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 1], [[1, 0]] * 4))
    # Wrong rollouts 0, 1, 2 answered 0, 1, 0: two distinct answers, not all the same.
    assert maker.meds_state.diversity["wrong_answers_distinct_per_question"] == 2
    assert maker.meds_state.diversity["wrong_questions_single_answer_share"] == 0


# ── Checkpoints and logs ──


def test_resume_restores_the_memory_exactly(tmp_path, local_ray):
    straight = build(MEDS_ARGS, str(tmp_path / "straight"))
    train_steps(straight, 3)

    first = build(MEDS_ARGS, str(tmp_path / "resumed"))
    train_steps(first, 2)
    resumed = build([*MEDS_ARGS, "--ckpt.load_enable"], str(tmp_path / "resumed"))
    states = resumed.trainer.init_checkpoint_states()
    resumed.trainer.restore_best_checkpoint_state(states)
    assert states["global_step"] == 2
    train_steps(resumed, 1, start_step=3)

    a, b = straight.maker.meds_state.memory.state_dict(), resumed.maker.meds_state.memory.state_dict()
    assert a["keys"] == b["keys"] and a["correct"] == b["correct"]
    for x, y in zip(a["vectors"] + a["labels"], b["vectors"] + b["labels"]):
        np.testing.assert_array_equal(x, y)


def test_step_metrics_reach_tensorboard(tmp_path, local_ray):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = build([*MEDS_ARGS, "--logger.tensorboard_dir", str(tmp_path / "tb")], str(tmp_path / "ckpt"))
    train_steps(run, 2)
    run.trainer.tensorboard_logger.writer.flush()
    (log_dir,) = [os.path.join(r, "") for r, _, files in os.walk(tmp_path / "tb") if files]
    events = EventAccumulator(log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("memories", "stored_vectors", "clusters", "penalised_wrong_share", "without_feature_share",
                 "penalty_mean", "penalty_max", "controller_seconds", "wrong_answers_distinct_per_question",
                 "wrong_questions_single_answer_share", "top1_eigen_ratio"):  # fmt: skip
        assert f"train/meds/{name}" in tags
    assert [e.value for e in events.Scalars("train/meds/stored_vectors")][-1] > 0


# ── Evaluation ──


def test_evaluation_logs_unbiased_pass_at_k_beside_upstreams(tmp_path):
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.trainer.ppo_utils.experience import Experience

    args = parse_train_args([*MEDS_ARGS, "--ckpt.path", str(tmp_path)])
    trainer_class = PPOTrainer.__ray_metadata__.modified_class
    trainer = trainer_class.__new__(trainer_class)
    rewards = [1, 0, 0, 0, 1, 1, 0, 0]  # two questions, 4 samples each: c = 1 and c = 2
    samples = [Experience(prompts=[f"q{i // 4}"], rewards=torch.tensor([float(r)])) for i, r in enumerate(rewards)]
    trainer.args, trainer.eval_dataloader = args, [(["math"] * 2, ["q0", "q1"], ["1", "2"], [None, None])]
    trainer.samples_generator = SimpleNamespace(generate_eval_samples=lambda **kw: samples)
    trainer.wandb_logger = trainer.tensorboard_logger = None

    logs = trainer.evaluate(1, n_samples_per_prompt=4)

    assert logs["eval_math_pass1"] == pytest.approx(0.375) and logs["eval_math_pass4"] == pytest.approx(1.0)
    assert logs["eval_unbiased_pass@1"] == pytest.approx((0.25 + 0.5) / 2)
    assert logs["eval_unbiased_pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert logs["eval_unbiased_pass@4"] == pytest.approx(1.0)
    args.algo.meds.enable = False
    assert not any("unbiased" in k for k in trainer.evaluate(1, n_samples_per_prompt=4))
