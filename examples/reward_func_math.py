"""The math reward for OpenRLHF: 0/1 for the last ``\\boxed{...}`` of each response, checked with math-verify.

Usage (OpenRLHF 0.11.2 loads this file by path and calls its ``reward_func`` for each rollout)::

    --reward.remote_url examples/reward_func_math.py

The function lives in the package, ``meds_patch.tools.reward_func_math``, which documents what it returns, its
time limit per answer (``MEDS_REWARD_TIMEOUT``) and its worker pool (``MEDS_REWARD_WORKERS``). Copy this file to
write your own reward: any ``reward_func(queries, prompts, labels, **kwargs)`` returning ``{"rewards", "scores",
"extra_logs"}`` works.
"""

from meds_patch.tools.reward_func_math import reward_func

__all__ = ["reward_func"]
