"""The entropy-advantage baseline of the MEDS paper's comparison (Cheng et al., "Reasoning with Exploration: An
Entropy Perspective", arXiv:2506.14758), for any trainer that has per-token advantages and entropies."""

import torch


def entropy_advantage(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float = 0.4, kappa: float = 2.0):
    """Each token's advantage plus an entropy bonus that never outweighs it: A_t + min(alpha * H_t, |A_t| / kappa).

    H_t is detached: the bonus shapes the advantage, it is not a loss on the entropy. The clip at |A_t| / kappa keeps
    the sign of every advantage, so a wrong rollout is still pushed down. alpha 0.4 and kappa 2 are the values in
    the authors' code (MEDS's veRL fork, dp_actor.py). A new tensor: the caller's advantages stay as they were."""
    return advantages + torch.minimum(alpha * entropy.detach().to(advantages.dtype), advantages.abs() / kappa)
