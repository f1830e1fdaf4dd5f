"""Signs of policy collapse: how varied the wrong answers are, whether the memory's clusters track them, and
unbiased pass@k (Chen et al., 2021)."""

import math
from collections import defaultdict
from typing import Dict, Optional, Sequence

import numpy as np

from meds_patch.core.answers import answer_key


def wrong_answer_diversity(keys: Sequence[str], correct: Sequence[bool], answers: Sequence[Optional[str]]) -> dict:
    """Per step: the mean number of distinct final answers among each question's wrong rollouts, and the share of
    questions with two or more wrong rollouts that all gave the same answer. Answers are told apart by
    ``answer_key``, as the memory does (a missing answer counts as one)."""
    wrong: Dict[str, list] = defaultdict(list)
    for key, ok, answer in zip(keys, correct, answers):
        if not ok:
            wrong[key].append(answer_key(answer))
    distinct = [len(set(a)) for a in wrong.values()]
    repeated = [len(set(a)) == 1 for a in wrong.values() if len(a) >= 2]
    return {
        "wrong_answers_distinct_per_question": sum(distinct) / len(distinct) if distinct else 0.0,
        "wrong_questions_single_answer_share": sum(repeated) / len(repeated) if repeated else 0.0,
    }


def top1_eigen_ratio(keys: Sequence[str], features: np.ndarray) -> dict:
    """The paper's spectral concentration of a question's rollouts (its Figure 5; 1 when they all point one way, 1/m
    for m orthogonal ones): the largest eigenvalue's share of the uncentred second-moment matrix of their feature
    rows scaled to unit length (as the memory stores them), averaged over the step's questions with two or more
    rows. Rows without a finite, non-zero feature are left out; {} when no question has two."""
    rows: Dict[str, list] = defaultdict(list)
    for key, row in zip(keys, np.asarray(features, np.float64)):
        if np.isfinite(row).all() and row.any():
            rows[key].append(row / np.linalg.norm(row))
    # The eigenvalues of X^T X / m are the squared singular values of X / sqrt(m); their sum is 1 for unit rows.
    ratios = [np.linalg.svd(np.array(r), compute_uv=False)[0] ** 2 / len(r) for r in rows.values() if len(r) >= 2]
    return {"top1_eigen_ratio": float(np.mean(ratios))} if ratios else {}


def cluster_answer_agreement(correct: np.ndarray, votes, same_answer_counts: np.ndarray) -> dict:
    """Whether the memory's clusters track distinct wrong answers, over the step's wrong rollouts that the memory
    sized against a history (``votes``, ``memory.Votes``): Spearman's rank correlation between their cluster size
    n and the number of earlier wrong rollouts of the question with the same final answer (left out when either
    is constant), and the share whose vote went to HDBSCAN noise. Clusters that are slices of time rather than
    error modes give a correlation near 0."""
    from scipy.stats import spearmanr

    rows = ~np.asarray(correct, bool) & votes.sized
    if not rows.any():
        return {}
    metrics = {"diagnosed_wrong_rollouts": int(rows.sum()), "noise_vote_share": float(votes.noise[rows].mean())}
    sizes, counts = votes.sizes[rows], np.asarray(same_answer_counts)[rows]
    if len(np.unique(sizes)) > 1 and len(np.unique(counts)) > 1:
        metrics["cluster_answer_rank_correlation"] = float(spearmanr(sizes, counts).statistic)
    return metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form of the ratio avoids huge binomials (Chen et al., 2021).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
