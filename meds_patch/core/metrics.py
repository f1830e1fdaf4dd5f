"""Signs of policy collapse: how varied the wrong answers are, and unbiased pass@k (Chen et al., 2021)."""

import math
from collections import defaultdict
from typing import Dict, Optional, Sequence


def wrong_answer_diversity(keys: Sequence[str], correct: Sequence[bool], answers: Sequence[Optional[str]]) -> dict:
    """Per step: the mean number of distinct final answers among each question's wrong rollouts, and the share of
    questions with two or more wrong rollouts that all gave the same answer (a missing answer counts as one)."""
    wrong: Dict[str, list] = defaultdict(list)
    for key, ok, answer in zip(keys, correct, answers):
        if not ok:
            wrong[key].append(" ".join(answer.split()) if answer is not None else None)
    distinct = [len(set(a)) for a in wrong.values()]
    repeated = [len(set(a)) == 1 for a in wrong.values() if len(a) >= 2]
    return {
        "wrong_answers_distinct_per_question": sum(distinct) / len(distinct) if distinct else 0.0,
        "wrong_questions_single_answer_share": sum(repeated) / len(repeated) if repeated else 0.0,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form of the ratio avoids huge binomials (Chen et al., 2021).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
