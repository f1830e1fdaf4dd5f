"""Rule-based 0/1 math reward for OpenRLHF: the last ``\\boxed{...}`` of the response, checked with math-verify.

OpenRLHF 0.11.2 loads a reward file by path (``--reward.remote_url FILE``) and calls its ``reward_func`` for each
rollout. ``examples/reward_func_math.py`` is the user-facing file, which re-exports this function; the demo and the
benchmarks hand OpenRLHF this module's own file, which ships in the wheel.

``reward_func(queries, prompts, labels)`` takes lists of equal length: full texts (prompt + response), prompt
texts and reference answers. It returns ``{"rewards", "scores", "extra_logs"}``, where rewards and scores are
float tensors of shape (N,) holding 1.0 for a correct answer and 0.0 otherwise (including no box, an unclosed
last box, any parsing error, and a check stopped at the time limit). ``extra_logs["boxed_found"]`` is 1.0 where
a complete box was found, ``extra_logs["verify_timeout"]`` 1.0 where the check was stopped.

Every answer is checked in a small pool of worker processes kept by a grading process of its own
(``meds_patch.tools.math_reward``), started at the first call, and a check gets at most ``MEDS_REWARD_TIMEOUT`` seconds (default 5) before its worker is killed and
replaced, with a logged warning. OpenRLHF calls this function from threads, where math-verify's own signal-based
timeouts cannot work, and some answers (``\\boxed{9^{9^{9^{9}}}}``) would otherwise stall the whole vLLM actor
for minutes. ``MEDS_REWARD_WORKERS`` sets the pool size (default min(4, CPUs)).
"""

import torch

from meds_patch.core.answers import last_boxed_answer
from meds_patch.tools.math_reward import judge


def reward_func(queries, prompts, labels, **kwargs):
    answers = []
    for query, prompt in zip(queries, prompts, strict=True):
        response = query[len(prompt) :] if query.startswith(prompt) else query
        answers.append(last_boxed_answer(response))
    correct, timed_out = judge(answers, labels)
    rewards = torch.tensor(correct, dtype=torch.float32)
    return {
        "rewards": rewards,
        "scores": rewards.clone(),
        "extra_logs": {
            "boxed_found": torch.tensor([answer is not None for answer in answers], dtype=torch.float32),
            "verify_timeout": torch.tensor(timed_out, dtype=torch.float32),
        },
    }
