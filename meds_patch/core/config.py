"""MEDS hyper-parameters (MEDS_SPEC.md); the defaults reproduce the authors' reference behaviour."""

from dataclasses import dataclass, fields
from typing import Optional

TARGETS = ("wrong", "right", "both")


@dataclass
class MEDSConfig:
    alpha: float = 0.1  # penalty scale, in reward units (double it for +-1 rewards)
    beta: Optional[float] = None  # penalty cap; None means 2 * alpha
    num_layers: int = 14  # K: last K transformer blocks read at the answer token
    knn_k: int = 3  # neighbours voting for a new vector's cluster
    min_cluster_size: int = 2  # HDBSCAN
    min_samples: int = 1  # HDBSCAN
    target: str = "wrong"  # which rollouts are penalised: "wrong" | "right" | "both"
    noise_as_cluster: bool = True  # a noise vote counts the stored noise points; False gives size 0
    max_per_memory: Optional[int] = None  # cap per memory, oldest dropped first; None keeps everything
    correct_threshold: float = 0.5  # score >= threshold counts as correct

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
