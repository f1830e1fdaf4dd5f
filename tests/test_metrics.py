"""Collapse metrics: the final answer, the diversity of wrong answers, unbiased pass@k."""

import numpy as np
import pytest

from meds_patch.core.answers import last_boxed_answer
from meds_patch.core.memory import Votes
from meds_patch.core.metrics import cluster_answer_agreement, pass_at_k, top1_eigen_ratio, wrong_answer_diversity


def test_last_box_wins_and_nested_braces_match():
    assert last_boxed_answer("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"


def test_escaped_braces_do_not_count():
    assert last_boxed_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed_answer("\\boxed{\\left\\{ x \\right.}") == "\\left\\{ x \\right."


def test_an_unclosed_last_box_or_no_box_gives_none():
    assert last_boxed_answer("\\boxed{3} then \\boxed{\\frac{1}{2") is None
    assert last_boxed_answer("no box here") is None


def test_fbox_and_a_space_before_the_brace_are_boxes():
    assert last_boxed_answer("\\fbox{7}") == "7" and last_boxed_answer("\\boxed {8}") == "8"


def test_wrong_answer_diversity_counts_distinct_wrong_answers_per_question():
    keys = ["a", "a", "a", "a", "b", "b", "b", "c"]
    correct = [False, False, False, True, False, False, True, True]
    answers = ["3", "3 ", "4", "5", "7", "7", "8", "9"]
    stats = wrong_answer_diversity(keys, correct, answers)
    # a: wrong {3, 4} -> 2 distinct; b: wrong {7} -> 1 (all the same); c has no wrong rollout.
    assert stats["wrong_answers_distinct_per_question"] == pytest.approx(1.5)
    assert stats["wrong_questions_single_answer_share"] == pytest.approx(0.5)


def test_wrong_answer_diversity_tells_answers_apart_as_the_memory_does():
    # \dfrac and \frac, and a final period, are layout: two answers (1/2 and 85), as answer_key sees them.
    stats = wrong_answer_diversity(["a"] * 4, [False] * 4, ["\\dfrac{1}{2}", "\\frac{1}{2}", "85.", "85"])
    assert stats["wrong_answers_distinct_per_question"] == 2.0


def test_missing_answers_count_as_one_answer():
    stats = wrong_answer_diversity(["a", "a"], [False, False], [None, None])
    assert stats == {"wrong_answers_distinct_per_question": 1.0, "wrong_questions_single_answer_share": 1.0}


def test_no_wrong_rollouts_gives_zeros():
    assert wrong_answer_diversity(["a"], [True], ["1"])["wrong_answers_distinct_per_question"] == 0.0


def test_top1_eigen_ratio_is_one_for_rollouts_that_point_one_way():
    # Lengths do not count: rows are scaled to unit length first.
    assert top1_eigen_ratio(["a"] * 3, [[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]]) == {
        "top1_eigen_ratio": pytest.approx(1.0)
    }


def test_top1_eigen_ratio_of_n_orthonormal_rollouts_is_one_over_n():
    assert top1_eigen_ratio(["a"] * 4, np.eye(4) * 3)["top1_eigen_ratio"] == pytest.approx(0.25)


def test_top1_eigen_ratio_averages_questions_and_leaves_out_rows_without_a_feature():
    # a: (1, 0) and (0, 1) -> 1/2. b: (1, 0) and (1, 1)/sqrt 2: X^T X / 2 = [[3/4, 1/4], [1/4, 1/4]], whose largest
    # eigenvalue is 1/2 + sqrt(2)/4. c: one finite row only, left out.
    keys = ["a", "a", "a", "b", "b", "c", "c"]
    rows = [[1, 0], [0, 1], [np.nan, np.nan], [1, 0], [1, 1], [2, 0], [np.nan, 1]]
    expected = (0.5 + (0.5 + np.sqrt(2) / 4)) / 2
    assert top1_eigen_ratio(keys, rows)["top1_eigen_ratio"] == pytest.approx(expected)
    assert top1_eigen_ratio(["c", "c"], [[2, 0], [np.nan, 1]]) == {}


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 0, 1, 0.0),
        (4, 1, 1, 0.25),
        (4, 2, 2, 1 - 1 / 6),
        (4, 1, 4, 1.0),
        (16, 3, 4, 1 - (13 * 12 * 11 * 10) / (16 * 15 * 14 * 13)),
    ],
)
def test_pass_at_k_is_one_minus_the_chance_that_k_draws_miss(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 5, 1)


def votes(sizes, noise, sized):
    return Votes(np.array(sizes), np.array(noise, bool), np.array(sized, bool))


def test_cluster_answer_agreement_ranks_cluster_sizes_against_same_answer_counts():
    # Wrong rows 0-3 sized; row 4 is correct, row 5 had no history: both left out.
    correct = np.array([False, False, False, False, True, False])
    same = votes([4, 1, 2, 9, 7, 0], [False, True, False, False, False, False], [True] * 5 + [False])
    # Sizes 4, 1, 2, 9 rank 3, 1, 2, 4; counts 3, 0, 1, 5 rank the same, counts 1, 5, 3, 0 the other way round.
    agreement = cluster_answer_agreement(correct, same, np.array([3, 0, 1, 5, 0, 2]))
    assert agreement == {
        "diagnosed_wrong_rollouts": 4, "noise_vote_share": 0.25, "cluster_answer_rank_correlation": pytest.approx(1)
    }  # fmt: skip
    reversed_ = cluster_answer_agreement(correct, same, np.array([1, 5, 3, 0, 0, 2]))
    assert reversed_["cluster_answer_rank_correlation"] == pytest.approx(-1)


def test_cluster_answer_agreement_leaves_out_a_correlation_it_cannot_compute():
    correct = np.zeros(3, bool)
    assert "cluster_answer_rank_correlation" not in cluster_answer_agreement(
        correct, votes([2, 2, 2], [0, 0, 0], [1, 1, 1]), np.array([0, 1, 2])
    )
    assert cluster_answer_agreement(correct, votes([1, 2, 3], [0, 0, 0], [0, 0, 0]), np.array([0, 1, 2])) == {}
