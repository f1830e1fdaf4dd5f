"""ErrorMemory against a second, deliberately naive reading of docs/ALGORITHM.md §2-4, over many random steps.

The reference below loops row by row, measures cosine distance one pair at a time, votes with a Counter, and
clusters with hdbscan's estimator on sklearn-normalised rows: it shares no code with meds_patch.core.memory.
"""

import math
from collections import Counter

import hdbscan
import numpy as np
import pytest
from sklearn.preprocessing import normalize

from meds_patch import ErrorMemory, MEDSConfig


class SpecMemory:
    def __init__(self, config: MEDSConfig):
        self.config = config
        self.stored = {}  # (key, correct) -> list of vectors, oldest first
        self.labels = {}  # (key, correct) -> labels of the last clustering

    def size_of(self, memory, x):
        history = self.stored.get(memory, [])
        if not history:
            return 0
        labels = self.labels[memory]

        def cosine_distance(i):
            h = history[i]
            return 1 - float(np.dot(x, h) / (np.linalg.norm(x) * np.linalg.norm(h)))

        nearest = sorted(range(len(history)), key=cosine_distance)[: min(self.config.knn_k, len(history))]
        votes = Counter(int(labels[i]) for i in nearest)
        top = max(votes.values())
        winner = min(label for label, count in votes.items() if count == top)
        if winner == -1 and not self.config.noise_as_cluster:
            return 0
        return sum(1 for label in labels if label == winner)

    def step(self, keys, correct, features):
        targeted = {"wrong": lambda ok: not ok, "right": lambda ok: ok, "both": lambda ok: True}[self.config.target]
        penalties, new = [], {}
        for key, ok, x in zip(keys, correct, features):
            if not np.isfinite(x).all() or not targeted(ok):
                penalties.append(0.0)
                continue
            size = self.size_of((key, ok), x)  # history only: this step's rows are added afterwards
            penalties.append(min(self.config.alpha * math.log(size + 1), self.config.penalty_cap))
            new.setdefault((key, ok), []).append(x)
        for memory, rows in new.items():
            history = self.stored.get(memory, []) + rows
            if self.config.max_per_memory is not None:
                history = history[-self.config.max_per_memory :]
            self.stored[memory] = history
            if len(history) < 2:
                self.labels[memory] = [-1] * len(history)
            else:
                clusterer = hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1, metric="euclidean")
                self.labels[memory] = list(clusterer.fit_predict(normalize(np.array(history, dtype=np.float64))))
        return penalties


def random_steps(seed, steps=30, questions=5, width=6):
    """Steps of 2-3 questions drawn again and again, each with a few recurring error modes, some rows
    without a feature, and both outcomes of a question within one step."""
    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(questions, 3, width))
    for _ in range(steps):
        keys, correct, features = [], [], []
        for q in rng.choice(questions, size=rng.integers(2, 4), replace=False):
            for _ in range(rng.integers(3, 9)):
                keys.append(f"q{q}")
                correct.append(bool(rng.random() < 0.3))
                features.append(modes[q, rng.integers(3)] + rng.normal(scale=0.05, size=width))
                if rng.random() < 0.1:
                    features[-1] = np.full(width, np.nan)
        yield keys, np.array(correct), np.array(features, dtype=np.float32)


CONFIGS = {
    "reference": MEDSConfig(),
    "noise-zero": MEDSConfig(noise_as_cluster=False),
    "target-both": MEDSConfig(target="both", alpha=0.2),
    "capped": MEDSConfig(max_per_memory=12),
    "knn-5": MEDSConfig(knn_k=5, beta=0.5),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_penalties_equal_the_naive_reading_of_the_spec(name, seed):
    config = CONFIGS[name]
    memory, reference = ErrorMemory(config), SpecMemory(config)
    penalised = 0
    for keys, correct, features in random_steps(seed):
        expected = reference.step(keys, correct, features.astype(np.float64))
        np.testing.assert_allclose(memory.update(keys, correct, features), expected, rtol=0, atol=1e-12)
        penalised += sum(p > 0 for p in expected)
    assert penalised > 50  # the scenario exercises the penalty, not only first visits


def test_penalties_equal_the_spec_across_a_save_and_restore():
    config = MEDSConfig()
    memory, reference = ErrorMemory(config), SpecMemory(config)
    for step, (keys, correct, features) in enumerate(random_steps(seed=2)):
        if step == 15:
            restored = ErrorMemory(config)
            restored.load_state_dict(memory.state_dict())
            memory = restored
        expected = reference.step(keys, correct, features.astype(np.float64))
        np.testing.assert_allclose(memory.update(keys, correct, features), expected, rtol=0, atol=1e-12)
