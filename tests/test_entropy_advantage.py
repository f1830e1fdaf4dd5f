"""The entropy-advantage baseline (Cheng et al., arXiv:2506.14758), the fourth run of the MEDS paper's comparison:
A_t + min(alpha * H_t, |A_t| / kappa) per token, default-off, its flags through upstream's real parser."""

import pytest
import torch

from meds_patch.core.entropy_advantage import entropy_advantage
from tests.inprocess import parse_train_args

BASE_ARGS = ["--reward.remote_url", "rule", "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "2"]


def test_the_bonus_is_alpha_times_the_entropy_capped_at_the_advantage_over_kappa():
    advantages = torch.tensor([[1.0, -0.5, 0.0, -2.0]])
    entropy = torch.tensor([[0.5, 2.0, 3.0, 1.0]])
    # min(0.2, 0.5) = 0.2; min(0.8, 0.25) = 0.25; min(1.2, 0) = 0; min(0.4, 1.0) = 0.4
    expected = torch.tensor([[1.2, -0.25, 0.0, -1.6]])
    torch.testing.assert_close(entropy_advantage(advantages, entropy, alpha=0.4, kappa=2.0), expected)


def test_the_shaped_advantages_carry_no_gradient_to_the_entropy_and_leave_the_input_alone():
    advantages, entropy = torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.2], requires_grad=True)
    shaped = entropy_advantage(advantages, entropy)
    assert not shaped.requires_grad
    torch.testing.assert_close(advantages, torch.tensor([0.5, -1.0]))


def test_the_entropy_advantage_is_off_by_default_and_leaves_the_entropy_coefficient_alone():
    args = parse_train_args(BASE_ARGS)
    assert args.algo.entropy_advantage.enable is False and args.actor.entropy_coef is None


def test_the_entropy_advantage_has_the_authors_defaults_and_makes_the_actor_compute_the_entropy():
    args = parse_train_args([*BASE_ARGS, "--algo.entropy_advantage.enable"])
    options = args.algo.entropy_advantage
    assert (options.alpha, options.kappa) == (0.4, 2.0)
    assert args.actor.entropy_coef == 0.0  # computed and logged, not in the loss


def test_an_entropy_bonus_given_with_the_entropy_advantage_is_kept():
    args = parse_train_args([*BASE_ARGS, "--algo.entropy_advantage.enable", "--actor.entropy_coef", "0.01"])
    assert args.actor.entropy_coef == 0.01


@pytest.mark.parametrize("flag, value", [("kappa", "0"), ("alpha", "-1"), ("alpha", "nan")])
def test_invalid_entropy_advantage_values_name_the_flag(flag, value):
    with pytest.raises(ValueError, match=rf"--algo\.entropy_advantage\.{flag}=\S+ is invalid"):
        parse_train_args([*BASE_ARGS, "--algo.entropy_advantage.enable", f"--algo.entropy_advantage.{flag}", value])
