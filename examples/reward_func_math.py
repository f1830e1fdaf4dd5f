"""Rule-based 0/1 math reward for OpenRLHF: the last ``\\boxed{...}`` of the response, checked with math-verify.

Usage (OpenRLHF 0.11.2 loads this file and calls ``reward_func`` for each rollout)::

    --reward.remote_url examples/reward_func_math.py

``reward_func(queries, prompts, labels)`` takes lists of equal length: full texts (prompt + response), prompt
texts and reference answers. It returns ``{"rewards", "scores", "extra_logs"}``, where rewards and scores are
float tensors of shape (N,) holding 1.0 for a correct answer and 0.0 otherwise (including no box, an unclosed
last box, and any parsing error), and ``extra_logs["boxed_found"]`` is 1.0 where a complete box was found.

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the main thread;
with its default arguments it raises ``ValueError`` in any other thread. OpenRLHF calls ``reward_func`` from a
worker thread (``asyncio.to_thread``), so there the timeouts are switched off (``parsing_timeout=None``,
``timeout_seconds=None``). In the main thread the 5-second limits are kept. Without them a pathological answer
can hang ``verify``: on ``\\boxed{9^{9^{9^{9}}}}`` it did not finish within a minute, and as that time goes to
big-integer arithmetic holding the GIL, the whole process stalls, not just its thread.
"""

import threading

import torch
from math_verify import parse, verify
from math_verify.errors import TimeoutException

from meds_patch.metrics import last_boxed_answer

_TIMEOUT_SECONDS = 5


def _is_correct(answer, label):
    timeout = _TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse("\\boxed{" + str(label) + "}", parsing_timeout=timeout)
        pred = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return False


def reward_func(queries, prompts, labels, **kwargs):
    rewards, boxed_found = [], []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        response = query[len(prompt) :] if query.startswith(prompt) else query
        answer = last_boxed_answer(response)
        boxed_found.append(float(answer is not None))
        rewards.append(float(answer is not None and _is_correct(answer, label)))
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return {
        "rewards": rewards,
        "scores": rewards.clone(),
        "extra_logs": {"boxed_found": torch.tensor(boxed_found, dtype=torch.float32)},
    }
