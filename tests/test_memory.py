"""docs/ALGORITHM.md §2-4: the error memory, its clustering and the penalty it returns."""

import math
import pickle

import hdbscan
import numpy as np
import pytest
from sklearn.preprocessing import normalize

from meds_patch import ErrorMemory, MEDSConfig, prompt_key
from meds_patch.core.answers import answer_key
from meds_patch.core.memory import AnswerMemory

E = np.eye(4, dtype=np.float32)
WRONG = False


def near(axis: int, count: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """`count` vectors within a hair of the unit vector on `axis`."""
    rng = np.random.default_rng(seed)
    return E[axis] + scale * rng.standard_normal((count, 4)).astype(np.float32)


def step(memory, key, vectors, correct=False):
    return memory.update([key] * len(vectors), [correct] * len(vectors), vectors)


def hand_made(labels, vectors, **config) -> ErrorMemory:
    """A memory holding exactly these wrong vectors and labels for key 'q'."""
    memory = ErrorMemory(MEDSConfig(**config))
    memory.load_state_dict(
        {
            "version": 1,
            "config": {},
            "keys": ["q"],
            "correct": [False],
            "vectors": [np.asarray(vectors, dtype=np.float32)],
            "labels": [np.asarray(labels)],
        }
    )
    return memory


def test_first_visit_is_never_penalised():
    memory = ErrorMemory()
    assert step(memory, "q", near(0, 5)).tolist() == [0.0] * 5


def test_new_vectors_of_one_step_do_not_count_toward_each_other():
    memory = ErrorMemory()
    identical = np.repeat(E[:1], 8, axis=0)
    assert step(memory, "q", identical).tolist() == [0.0] * 8


def test_second_visit_is_penalised_by_the_size_of_the_voted_cluster():
    memory = ErrorMemory()
    step(memory, "q", np.concatenate([near(0, 3, seed=1), near(1, 3, seed=2)]))
    labels = memory.labels[("q", WRONG)]
    assert labels[0] == labels[1] == labels[2] != labels[3] == labels[4] == labels[5] != -1

    penalties = step(memory, "q", near(0, 1, seed=3))

    assert penalties.tolist() == pytest.approx([0.1 * math.log(3 + 1)])


def test_noise_vote_counts_the_stored_noise_points():
    memory = ErrorMemory()
    step(memory, "q", np.stack([E[0], E[1]]))  # two points: HDBSCAN leaves both as noise
    assert memory.labels[("q", WRONG)].tolist() == [-1, -1]
    assert step(memory, "q", E[2:3]).tolist() == pytest.approx([0.1 * math.log(2 + 1)])


def test_noise_vote_gives_zero_when_noise_is_not_a_cluster():
    memory = ErrorMemory(MEDSConfig(noise_as_cluster=False))
    step(memory, "q", np.stack([E[0], E[1]]))
    assert step(memory, "q", E[2:3]).tolist() == [0.0]


def test_a_memory_of_one_vector_gives_size_one():
    memory = ErrorMemory()
    step(memory, "q", E[:1])
    assert memory.labels[("q", WRONG)].tolist() == [-1]
    assert step(memory, "q", E[1:2]).tolist() == pytest.approx([0.1 * math.log(2)])


def test_vote_tie_goes_to_the_smallest_label():
    # k = 3 nearest carry labels 2, 0, 1 (one vote each): label 0 wins; it has 2 members in memory.
    vectors = [E[0] + 0.1 * E[1], E[0] + 0.1 * E[2], E[0] + 0.1 * E[3], E[1], E[2], E[3]]
    memory = hand_made([2, 0, 1, 0, 2, 2], vectors)
    assert memory.update(["q"], [False], E[:1]).tolist() == pytest.approx([0.1 * math.log(2 + 1)])


def test_vote_tie_between_noise_and_a_cluster_goes_to_noise():
    vectors = [E[0] + 0.1 * E[1], E[0] + 0.1 * E[2], E[3], E[3], E[3]]
    memory = hand_made([-1, 0, -1, -1, 0], vectors, knn_k=2)
    # votes: -1 and 0 once each -> -1 (smaller) -> 3 noise points stored
    assert memory.update(["q"], [False], E[:1]).tolist() == pytest.approx([0.1 * math.log(3 + 1)])


def test_neighbours_are_found_by_cosine_not_euclidean_distance():
    # Euclidean nearest to 0.1*e0 is 0.2*e1 (label 1, size 1); cosine nearest are the long e0 vectors (size 2).
    memory = hand_made([0, 0, 1], [10 * E[0], 11 * E[0], 0.2 * E[1]], knn_k=1)
    assert memory.update(["q"], [False], 0.1 * E[:1]).tolist() == pytest.approx([0.1 * math.log(2 + 1)])


def test_penalty_is_capped_at_beta():
    memory = hand_made([0] * 30, np.repeat(E[:1], 30, axis=0))
    assert memory.update(["q"], [False], E[:1]).tolist() == pytest.approx([0.2])  # 0.1*ln(31) > 2*alpha


def test_explicit_beta_caps_the_penalty():
    memory = hand_made([0] * 30, np.repeat(E[:1], 30, axis=0), alpha=0.1, beta=0.25)
    assert memory.update(["q"], [False], E[:1]).tolist() == pytest.approx([0.25])


def test_clustering_is_hdbscan_on_unit_rows():
    rng = np.random.default_rng(7)
    vectors = np.concatenate([c + 0.05 * rng.standard_normal((12, 4)) for c in (E[0], E[1], -E[0])]).astype(np.float32)
    vectors *= rng.uniform(0.5, 20, size=(len(vectors), 1)).astype(np.float32)  # magnitudes must not matter
    memory = ErrorMemory()
    step(memory, "q", vectors)
    expected = hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1, metric="euclidean").fit_predict(
        normalize(vectors.astype(np.float64))
    )
    assert memory.labels[("q", WRONG)].tolist() == expected.tolist()
    assert len(set(expected[:12])) == 1 and expected[0] != expected[12] != expected[24]


def test_labels_are_refit_on_history_plus_the_new_step():
    memory = ErrorMemory()
    step(memory, "q", near(0, 3, seed=1))
    step(memory, "q", near(1, 3, seed=2))
    labels = memory.labels[("q", WRONG)]
    assert len(labels) == 6 and labels[0] == labels[2] != labels[3] == labels[5]


def test_correct_rollouts_are_neither_penalised_nor_stored_with_target_wrong():
    memory = ErrorMemory()
    step(memory, "q", near(0, 3), correct=True)
    assert step(memory, "q", near(0, 3), correct=True).tolist() == [0.0] * 3
    assert ("q", True) not in memory.vectors


def test_target_right_penalises_recurring_correct_answers_only():
    memory = ErrorMemory(MEDSConfig(target="right"))
    step(memory, "q", np.stack([E[0], E[1]]), correct=True)
    step(memory, "q", np.stack([E[0], E[1]]), correct=False)
    assert step(memory, "q", E[:1], correct=True).tolist() == pytest.approx([0.1 * math.log(3)])
    assert step(memory, "q", E[:1], correct=False).tolist() == [0.0]


def test_outcomes_and_questions_have_separate_memories():
    memory = ErrorMemory(MEDSConfig(target="both"))
    step(memory, "q", np.stack([E[0], E[1]]), correct=True)
    assert step(memory, "q", E[:1], correct=False).tolist() == [0.0]
    assert step(memory, "other", E[:1], correct=True).tolist() == [0.0]


def test_cap_drops_the_oldest_vectors_first():
    memory = ErrorMemory(MEDSConfig(max_per_memory=4))
    step(memory, "q", np.stack([E[0], E[1], E[2]]))
    step(memory, "q", np.stack([E[3], 2 * E[3]]))
    np.testing.assert_array_equal(memory.vectors[("q", WRONG)], np.stack([E[1], E[2], E[3], 2 * E[3]]))
    assert len(memory.labels[("q", WRONG)]) == 4


def test_rows_with_nan_or_inf_have_no_feature_and_are_counted():
    memory = ErrorMemory()
    step(memory, "q", np.stack([E[0], E[1]]))
    features = np.stack([E[0], np.full(4, np.nan), np.array([1, np.inf, 0, 0])]).astype(np.float32)
    penalties = memory.update(["q"] * 3, [False] * 3, features)
    assert penalties[1:].tolist() == [0.0, 0.0] and penalties[0] > 0
    assert len(memory.vectors[("q", WRONG)]) == 3
    assert memory.last_step.without_feature == 2 and memory.last_step.non_finite == 1


def test_empty_batch_returns_no_penalties():
    assert ErrorMemory().update([], [], np.zeros((0, 14))).shape == (0,)
    assert ErrorMemory().update([], [], []).shape == (0,)


def test_many_identical_vectors_are_safe():
    memory = ErrorMemory()
    step(memory, "q", np.repeat(E[:1], 50, axis=0))
    penalties = step(memory, "q", np.repeat(E[:1], 50, axis=0))
    assert np.isfinite(penalties).all() and (penalties == pytest.approx(0.2))


def test_zero_vectors_are_safe():
    memory = ErrorMemory()
    step(memory, "q", np.zeros((3, 4), dtype=np.float32))
    assert np.isfinite(step(memory, "q", np.zeros((2, 4), dtype=np.float32))).all()


def test_mismatched_lengths_raise_a_clear_error():
    with pytest.raises(ValueError, match="N keys"):
        ErrorMemory().update(["a", "b"], [False], np.zeros((2, 4)))


def test_non_string_keys_raise_a_clear_error():
    with pytest.raises(ValueError, match="row 1 is int"):
        ErrorMemory().update(["a", 7], [False, False], np.zeros((2, 4)))


def test_feature_width_change_raises_a_clear_error():
    memory = ErrorMemory()
    step(memory, "q", np.zeros((2, 4), dtype=np.float32) + E[0])
    with pytest.raises(ValueError, match="5 values per row"):
        memory.update(["q"], [False], np.ones((1, 5)))


def test_restored_memory_gives_the_same_future_penalties():
    rng = np.random.default_rng(3)
    original = ErrorMemory()
    keys = [f"q{i % 5}" for i in range(40)]
    for _ in range(3):
        original.update(keys, rng.random(40) < 0.3, rng.standard_normal((40, 6)).astype(np.float32))
    restored = ErrorMemory()
    restored.load_state_dict(pickle.loads(pickle.dumps(original.state_dict())))
    for _ in range(2):
        correct, feats = rng.random(40) < 0.3, rng.standard_normal((40, 6)).astype(np.float32)
        np.testing.assert_array_equal(original.update(keys, correct, feats), restored.update(keys, correct, feats))


def test_state_dict_holds_only_plain_objects():
    memory = ErrorMemory()
    step(memory, "q", near(0, 3))
    state = memory.state_dict()
    assert set(state) == {"version", "kind", "config", "keys", "correct", "vectors", "labels", "arrivals", "updates"}
    assert state["keys"] == ["q"] and state["correct"] == [False]
    assert isinstance(state["vectors"][0], np.ndarray) and isinstance(state["config"], dict)


def test_load_state_dict_rejects_garbage():
    with pytest.raises(ValueError, match="not an ErrorMemory state"):
        ErrorMemory().load_state_dict({"vectors": []})


def test_prompt_key_collapses_whitespace_runs():
    assert prompt_key("What is  1 +\n\t2?") == prompt_key("What is 1 + 2?")
    assert prompt_key("What is 1 + 2?") != prompt_key("What is 1 + 3?")


def test_prompt_key_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        prompt_key(12)


def test_each_vector_remembers_the_update_that_stored_it():
    memory = ErrorMemory(MEDSConfig(max_per_memory=3))
    step(memory, "q", near(0, 2))
    step(memory, "other", near(1, 1))
    step(memory, "q", near(0, 2, seed=1))
    assert memory.arrivals[("q", WRONG)].tolist() == [1, 3, 3]  # capped at 3: the oldest went first
    assert memory.state_dict()["updates"] == 3


def test_a_rejected_update_changes_nothing():
    memory = ErrorMemory()
    with pytest.raises(ValueError):
        memory.update(["a", "b"], [False], np.zeros((2, 4)))
    assert memory.updates == 0 and memory.vectors == {}


def test_a_step_rejected_for_its_width_does_not_count_as_a_step():
    memory = ErrorMemory()
    step(memory, "q", near(0, 2))
    with pytest.raises(ValueError, match="5 values per row"):
        memory.update(["q"], [False], np.ones((1, 5)))
    assert memory.updates == 1 and memory.arrivals[("q", WRONG)].tolist() == [1, 1]


def three_memories() -> dict:
    memory = ErrorMemory()
    for key in ("a", "b", "c"):
        step(memory, key, near(0, 2))
    return memory.state_dict()


def loading_fails_and_changes_nothing(state: dict, match: str) -> None:
    memory = ErrorMemory()
    step(memory, "kept", near(1, 3))
    before = memory.state_dict()
    with pytest.raises(ValueError, match=match):
        memory.load_state_dict(state)
    after = memory.state_dict()
    assert after["keys"] == before["keys"] == ["kept"] and after["updates"] == before["updates"] == 1
    np.testing.assert_array_equal(after["vectors"][0], before["vectors"][0])


def test_a_state_with_a_bad_last_memory_loads_nothing():
    state = three_memories()
    state["labels"][2] = np.zeros(5, dtype=np.int64)  # 2 vectors, 5 labels
    loading_fails_and_changes_nothing(state, "for 'c': vectors")


def test_a_state_with_fewer_arrivals_than_keys_is_rejected():
    state = three_memories()
    state["arrivals"] = state["arrivals"][:2]
    loading_fails_and_changes_nothing(state, "2 arrivals for 3 keys")


def test_a_state_that_names_a_memory_twice_is_rejected():
    state = three_memories()
    state["keys"][1] = "a"
    loading_fails_and_changes_nothing(state, r"\('a', False\) appears twice")


def test_a_state_with_mixed_widths_is_rejected():
    state = three_memories()
    state["vectors"][1] = np.zeros((2, 5), np.float32)
    loading_fails_and_changes_nothing(state, r"different widths \[4, 5\]")


def test_labels_below_noise_are_rejected():
    state = three_memories()
    state["labels"][0] = np.array([0, -2])
    loading_fails_and_changes_nothing(state, "labels must be >= -1")


def test_arrivals_may_come_as_one_array():
    state = three_memories()
    state["arrivals"] = np.stack(state["arrivals"])  # (3 memories, 2 vectors)
    memory = ErrorMemory()
    memory.load_state_dict(state)
    assert [memory.arrivals[(k, WRONG)].tolist() for k in "abc"] == [[1, 1], [2, 2], [3, 3]]


def test_states_in_and_out_are_copies():
    memory = ErrorMemory()
    step(memory, "q", near(0, 2))
    state = memory.state_dict()
    state["vectors"][0][:] = 7.0
    assert (memory.vectors[("q", WRONG)] != 7.0).all()
    restored = ErrorMemory()
    restored.load_state_dict(state)
    state["vectors"][0][:] = 9.0
    assert (restored.vectors[("q", WRONG)] == 7.0).all()


def test_keys_given_as_one_string_raise_a_clear_error():
    with pytest.raises(ValueError, match="not one str"):
        ErrorMemory().update("q", [False], np.ones((1, 4)))


def test_features_without_columns_raise_a_clear_error():
    with pytest.raises(ValueError, match=r"features of shape \(2, 0\)"):
        ErrorMemory().update(["q", "q"], [False, False], np.zeros((2, 0)))


def test_bfloat16_feature_tensors_are_taken_as_float32():
    import torch

    memory = ErrorMemory()
    step(memory, "q", torch.tensor(near(0, 3), dtype=torch.bfloat16))
    assert memory.vectors[("q", WRONG)].dtype == np.float32 and memory.summary()["vectors"] == 3


# ── Votes: what each row's n came from (for the cluster-answer diagnostic) ──


def test_votes_say_which_rows_were_sized_against_a_history_and_which_went_to_noise():
    # Two clusters (axes 0 and 1) and one noise point (axis 3) of question "q"; "p" has no history.
    memory = hand_made([0, 0, 1, 1, -1], [E[0], E[0], E[1], E[1], E[3]], knn_k=1)
    memory.update(["q", "q", "p"], [WRONG, WRONG, WRONG], np.stack([E[0], E[3], E[0]]))
    np.testing.assert_array_equal(memory.last_votes.sizes, [2, 1, 0])
    np.testing.assert_array_equal(memory.last_votes.noise, [False, True, False])
    np.testing.assert_array_equal(memory.last_votes.sized, [True, True, False])


# ── The answer memory (--algo.meds.feature answer) ──


def test_answer_memory_counts_earlier_rollouts_of_the_question_with_the_same_answer():
    memory = AnswerMemory()
    first = memory.update(["q", "q", "q", "p"], [WRONG, WRONG, True, WRONG], ["85", "85", "95", None])
    np.testing.assert_array_equal(first, 0)  # no history: copies within one visit do not count
    second = memory.update(["q", "q", "p", "q"], [WRONG, WRONG, WRONG, True], ["85", "75", None, "95"])
    # q's 85 was given twice before, 75 never; p's missing answer once; a correct rollout is not penalised.
    np.testing.assert_allclose(second, [0.1 * math.log(3), 0.0, 0.1 * math.log(2), 0.0])
    np.testing.assert_array_equal(memory.last_votes.sizes, [2, 0, 1, 0])
    assert memory.summary() == {"memories": 2, "vectors": 6, "clusters": 3}


def test_answer_memory_tells_answers_apart_by_what_they_say_not_their_spacing():
    assert answer_key(" 8 5 ") == answer_key("85") == answer_key("$85$.") == "85"
    assert answer_key(r"\left( 1,\, 2 \right)") == "(1,2)"
    assert answer_key(r"\dfrac{1}{2}") == answer_key(r"\frac{1}{2}")
    assert answer_key(r"\leftarrow") == r"\leftarrow" and answer_key(None) == ""
    assert answer_key("0.5") != answer_key(r"\frac{1}{2}")  # text, not math-verify's equivalence


def test_answer_memory_state_round_trips_and_refuses_the_other_kind():
    memory = AnswerMemory()
    memory.update(["q", "q"], [WRONG, WRONG], ["85", "75"])
    restored = AnswerMemory()
    restored.load_state_dict(pickle.loads(pickle.dumps(memory.state_dict())))
    assert restored.state_dict() == memory.state_dict()
    np.testing.assert_array_equal(restored.update(["q"], [WRONG], ["85"]), [0.1 * math.log(2)])
    with pytest.raises(ValueError, match="keeps 'answer'"):
        ErrorMemory().load_state_dict(memory.state_dict())
    with pytest.raises(ValueError, match="keeps layer logits"):
        AnswerMemory().load_state_dict(ErrorMemory().state_dict())
