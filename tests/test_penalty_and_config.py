"""docs/ALGORITHM.md §4 penalty arithmetic and the configuration's validation."""

import math

import numpy as np
import pytest
import torch

from meds_patch import MEDSConfig, apply_penalties, penalty_term


def test_penalty_term_is_alpha_log_n_plus_one_capped_at_beta():
    p = penalty_term([0, 1, 3, 100], alpha=0.1, beta=0.2)
    assert p.tolist() == pytest.approx([0.0, 0.1 * math.log(2), 0.1 * math.log(4), 0.2])


def test_wrong_rollouts_lose_p_and_correct_ones_are_divided_by_one_plus_p():
    shaped = apply_penalties(np.array([0.0, 1.0, 1.0], dtype=np.float32), [False, True, True], [0.2, 0.0, 0.25])
    assert shaped.tolist() == pytest.approx([-0.2, 1.0, 0.8])
    assert shaped.dtype == np.float32


def test_tensor_rewards_come_back_as_tensors_of_their_dtype():
    import torch

    shaped = apply_penalties(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([False, True]), [0.5, 0.0])
    assert isinstance(shaped, torch.Tensor) and shaped.dtype == torch.float64
    assert shaped.tolist() == pytest.approx([-0.5, 1.0])


def test_apply_penalties_rejects_mismatched_shapes_and_bad_penalties():
    with pytest.raises(ValueError, match="one shape"):
        apply_penalties([1.0, 0.0], [True], [0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        apply_penalties([1.0], [False], [float("nan")])


def test_defaults_follow_the_reference():
    config = MEDSConfig()
    assert (config.alpha, config.beta, config.num_layers, config.knn_k) == (0.1, None, 14, 3)
    assert (config.min_cluster_size, config.min_samples, config.target) == (2, 1, "wrong")
    assert (config.noise_as_cluster, config.max_per_memory, config.correct_threshold) == (True, None, 0.5)
    assert config.penalty_cap == pytest.approx(0.2)


@pytest.mark.parametrize(
    "field, value",
    [
        ("alpha", -0.1),
        ("alpha", float("nan")),
        ("beta", -1.0),
        ("num_layers", 0),
        ("knn_k", 0),
        ("min_cluster_size", 1),
        ("min_samples", 0),
        ("target", "all"),
        ("noise_as_cluster", 1),
        ("max_per_memory", 0),
        ("correct_threshold", float("inf")),
        ("num_layers", 2.5),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_range(field, value):
    with pytest.raises(ValueError, match=rf"MEDSConfig\.{field}=.*must be"):
        MEDSConfig(**{field: value})


def test_penalty_term_rejects_negative_cluster_sizes():
    with pytest.raises(ValueError, match="cluster sizes must be finite and >= 0"):
        penalty_term([2, -1], 0.1, 0.2)


def test_penalty_term_rejects_a_negative_alpha():
    with pytest.raises(ValueError, match="alpha=-0.1"):
        penalty_term([2], -0.1, 0.2)


@pytest.mark.parametrize("outcome", [-1.0, None, 0.5])
def test_apply_penalties_rejects_outcomes_that_are_not_bools(outcome):
    with pytest.raises(ValueError, match="correct must hold bools"):
        apply_penalties(
            np.array([1.0, -1.0]), np.array([True, outcome], dtype=object if outcome is None else None), [0.0, 0.1]
        )


def test_apply_penalties_takes_zero_one_outcomes():
    np.testing.assert_allclose(apply_penalties([1.0, 0.0], [1, 0], [0.25, 0.25]), [0.8, -0.25])


def test_bfloat16_rewards_come_back_as_float32_tensors():
    shaped = apply_penalties(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), [True, False], [0.25, 0.25])
    assert shaped.dtype == torch.float32
    torch.testing.assert_close(shaped, torch.tensor([0.8, -0.25]))
