"""The MEDS penalty (docs/ALGORITHM.md §4): how much a recurring error pattern lowers a rollout's reward."""

import numpy as np


def penalty_term(cluster_sizes, alpha: float, beta: float) -> np.ndarray:
    """p = min(alpha * ln(n + 1), beta) for each cluster size n (size 0 gives p = 0)."""
    sizes = np.asarray(cluster_sizes, dtype=np.float64)
    if (sizes < 0).any() or not np.isfinite(sizes).all():
        raise ValueError(f"cluster sizes must be finite and >= 0, got {sizes[(sizes < 0) | ~np.isfinite(sizes)][:3]}")
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    return np.minimum(alpha * np.log1p(sizes), beta)


def apply_penalties(rewards, correct, p):
    """Shaped rewards: a wrong rollout gets r - p, a correct one r / (1 + p).

    ``ErrorMemory.update`` gives p = 0 to the rollouts its target leaves alone, so with the reference target
    "wrong" correct rollouts keep their reward exactly. Returns new rewards of the input's kind: a torch tensor
    (same dtype, at least float32, same device) for a tensor, else a numpy array.
    """
    if hasattr(rewards, "detach"):  # a torch tensor: compute in numpy, hand back a tensor like it
        import torch

        # (numpy has no bfloat16: compute in at least float32)
        shaped = apply_penalties(
            rewards.detach().cpu().to(torch.promote_types(rewards.dtype, torch.float32)).numpy(), correct, p
        )
        return torch.from_numpy(shaped).to(rewards.device)
    rewards = np.asarray(rewards)
    correct, p = np.asarray(correct), np.asarray(p, dtype=np.float64)  # numpy converts CPU tensors
    if correct.dtype != bool:
        # An outcome is a bool, or a 0/1 number; anything else (a -1.0 "wrong" of ±1 rewards, None) is a mistake.
        if correct.dtype.kind not in "iuf" or not np.isin(correct, (0, 1)).all():
            raise ValueError(f"correct must hold bools (or 0/1), got dtype {correct.dtype}: {correct.ravel()[:4]}")
        correct = correct.astype(bool)
    if not (rewards.shape == correct.shape == p.shape):
        raise ValueError(f"rewards {rewards.shape}, correct {correct.shape} and p {p.shape} must have one shape")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("penalties must be finite and >= 0")
    shaped = np.where(correct, rewards / (1.0 + p), rewards - p)
    return shaped.astype(np.result_type(rewards.dtype, np.float32))
