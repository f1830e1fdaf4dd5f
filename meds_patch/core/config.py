"""MEDS hyper-parameters and their help (docs/ALGORITHM.md); the defaults reproduce the authors' reference behaviour."""

from dataclasses import dataclass, field, fields
from typing import Optional

TARGETS = ("wrong", "right", "both")
FEATURES = ("layer_logits", "answer")


def option(default, help: str):
    """A field with its command-line help, which ``--algo.meds.<name> --help`` shows as it is."""
    return field(default=default, metadata={"help": help})


@dataclass
class MEDSConfig:
    alpha: float = option(
        0.1, "penalty scale p = min(alpha*ln(n+1), beta), in reward units (double it for +-1 rewards)"
    )
    beta: Optional[float] = option(None, "penalty cap; None means 2*alpha")
    num_layers: int = option(14, "K: the last K transformer blocks whose logit of the answer token form the feature")
    knn_k: int = option(3, "nearest stored vectors (cosine) voting for a new rollout's cluster")
    min_cluster_size: int = option(2, "HDBSCAN min_cluster_size")
    min_samples: int = option(1, "HDBSCAN min_samples")
    target: str = option("wrong", "rollouts penalised: wrong (r - p), right or both (correct ones get r / (1 + p))")
    noise_as_cluster: bool = option(
        True, "true: a vote for HDBSCAN noise counts the stored noise points; false: size 0"
    )
    max_per_memory: Optional[int] = option(
        None, "keep at most this many vectors per (question, outcome), oldest dropped; None keeps all"
    )
    correct_threshold: float = option(0.5, "a rollout is correct when its score (reward if no score) is >= this")
    feature: str = option(
        "layer_logits",
        "what the memory keeps of a rollout: layer_logits (the paper's: logits of the answer token, clustered) or "
        "answer (its final answer: n = earlier rollouts of the question with the same answer; no hooks, no "
        "clustering, any model)",
    )

    def __post_init__(self):
        def check(ok: bool, name: str, allowed: str):
            if not ok:
                raise ValueError(f"MEDSConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

        check(_is_real(self.alpha) and self.alpha >= 0, "alpha", "a finite number >= 0")
        check(self.beta is None or (_is_real(self.beta) and self.beta >= 0), "beta", "None or a finite number >= 0")
        check(_is_int(self.num_layers) and self.num_layers >= 1, "num_layers", "an integer >= 1")
        check(_is_int(self.knn_k) and self.knn_k >= 1, "knn_k", "an integer >= 1")
        check(_is_int(self.min_cluster_size) and self.min_cluster_size >= 2, "min_cluster_size", "an integer >= 2")
        check(_is_int(self.min_samples) and self.min_samples >= 1, "min_samples", "an integer >= 1")
        check(self.target in TARGETS, "target", f"one of {TARGETS}")
        check(isinstance(self.noise_as_cluster, bool), "noise_as_cluster", "a bool")
        check(
            self.max_per_memory is None or (_is_int(self.max_per_memory) and self.max_per_memory >= 1),
            "max_per_memory",
            "None or an integer >= 1",
        )
        check(_is_real(self.correct_threshold), "correct_threshold", "a finite number")
        check(self.feature in FEATURES, "feature", f"one of {FEATURES}")

    @property
    def penalty_cap(self) -> float:
        return 2 * self.alpha if self.beta is None else self.beta

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in fields(cls)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")
