"""Per-question memory of past answers' features, clustered with HDBSCAN (docs/ALGORITHM.md §2-3)."""

import hashlib
import logging
import re
import warnings
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import hdbscan
import numpy as np

from meds_patch.core.answers import answer_key
from meds_patch.core.config import MEDSConfig
from meds_patch.core.penalty import penalty_term

logger = logging.getLogger(__name__)
MemoryKey = Tuple[str, bool]  # (prompt key, correct)
STATE_VERSION = 1


def prompt_key(text: str) -> str:
    """Identify a question: a hash of its text with every run of whitespace collapsed to one space."""
    if not isinstance(text, str):
        raise TypeError(f"prompt_key needs the prompt text as str, got {type(text).__name__}")
    return hashlib.sha256(re.sub(r"\s+", " ", text).encode("utf-8")).hexdigest()[:32]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64, zero rows left at zero (as sklearn's ``normalize``, whose input
    validation alone cost ~0.25 ms a call: a third of a paper-scale step)."""
    vectors = vectors.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    return vectors / np.where(norms == 0, 1.0, norms)[:, None]


def cluster_labels(vectors: np.ndarray, config: MEDSConfig) -> np.ndarray:
    """HDBSCAN labels (-1 = noise) of the rows scaled to unit L2 norm; fewer than 2 rows are all noise."""
    if len(vectors) < 2:
        return np.full(len(vectors), -1, dtype=np.int64)
    with warnings.catch_warnings():  # hdbscan warns on duplicate points; they are expected here
        warnings.simplefilter("ignore")
        # The functional form of hdbscan.HDBSCAN(...).fit_predict: same labels, without the estimator's overhead.
        labels = hdbscan.hdbscan(
            unit_rows(vectors),
            min_cluster_size=config.min_cluster_size,
            min_samples=config.min_samples,
            metric="euclidean",
        )[0]
    return labels.astype(np.int64)


def checked_step(keys, correct, features, target: str, stored_width: Optional[int]):
    """Check one step's inputs; return (correct, features, rows to store) as numpy arrays.

    ``stored_width`` is the feature width the memory already holds (None when it holds nothing): a step whose
    stored rows have another width is rejected. Every error names the argument and what it got.
    """
    if isinstance(keys, str):
        raise ValueError("keys must be a sequence of prompt keys, one per row, not one str")
    n = len(keys)
    if hasattr(features, "detach"):  # a torch tensor, maybe bfloat16, which numpy cannot take directly
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    correct = np.asarray(correct)
    if features.ndim != 2 or features.shape[0] != n or correct.shape != (n,) or features.shape[1] == 0:
        raise ValueError(
            f"update needs N keys, N outcomes and an (N, K >= 1) feature array; got {n} keys, "
            f"outcomes of shape {correct.shape}, features of shape {features.shape}"
        )
    bad = [i for i, k in enumerate(keys) if not isinstance(k, str)]
    if bad:
        raise ValueError(f"keys must be str prompt keys; row {bad[0]} is {type(keys[bad[0]]).__name__}")
    if correct.dtype != bool:
        raise ValueError(f"correct must hold bools, got dtype {correct.dtype}")
    targeted = {"wrong": ~correct, "right": correct, "both": np.ones(n, dtype=bool)}[target]
    rows = np.flatnonzero(np.isfinite(features).all(axis=1) & targeted)
    if rows.size and stored_width not in (None, features.shape[1]):
        raise ValueError(f"features have {features.shape[1]} values per row, the memory holds {stored_width}")
    return correct, features, rows


def memory_groups(keys: Sequence[str], correct: np.ndarray, rows: np.ndarray):
    """Yield ((key, outcome), its rows) for the given rows, grouped with one sort instead of a loop over rows."""
    if not rows.size:
        return
    _, key_of_row = np.unique(np.asarray(keys, dtype=object)[rows], return_inverse=True)
    group = key_of_row * 2 + correct[rows]
    order = np.argsort(group, kind="stable")
    for members in np.split(rows[order], np.flatnonzero(np.diff(group[order])) + 1):
        yield (str(keys[members[0]]), bool(correct[members[0]])), members


@dataclass
class StepStats:
    """What one update saw, for the trainer's logs; measured the same way by every memory (sharded or not)."""

    rows: int = 0
    wrong: int = 0
    penalised_wrong: int = 0
    without_feature: int = 0  # rows not stored and not penalised: no answer position, or a non-finite value
    non_finite: int = 0  # of those, rows with a value that is not NaN (e.g. a bfloat16 overflow)
    mean_penalty: float = 0.0
    max_penalty: float = 0.0

    @classmethod
    def measure(cls, correct: np.ndarray, features: np.ndarray, penalties: np.ndarray) -> "StepStats":
        without = ~np.isfinite(features).all(axis=1)
        return cls(
            rows=len(correct),
            wrong=int((~correct).sum()),
            penalised_wrong=int(((penalties > 0) & ~correct).sum()),
            without_feature=int(without.sum()),
            non_finite=int((without & ~np.isnan(features).all(axis=1)).sum()),
            mean_penalty=float(penalties.mean()) if len(correct) else 0.0,
            max_penalty=float(penalties.max()) if len(correct) else 0.0,
        )


class Votes(NamedTuple):
    """Per row of the last update: the size n its penalty came from, whether its vote went to HDBSCAN noise, and
    whether it was sized against a history at all (a stored row whose memory held earlier rollouts)."""

    sizes: np.ndarray
    noise: np.ndarray
    sized: np.ndarray

    @classmethod
    def none(cls, rows: int) -> "Votes":
        return cls(np.zeros(rows, np.int64), np.zeros(rows, bool), np.zeros(rows, bool))


class ErrorMemory:
    """The MEDS memory: for each (question, outcome) the features of past rollouts and their cluster labels.

    ``update`` is one training step: it sizes each new rollout's error pattern from the history only, appends the
    new rollouts, re-clusters each touched memory (labels used on the next visit), and returns the penalty terms.
    """

    def __init__(self, config: Optional[MEDSConfig] = None):
        self.config = config or MEDSConfig()
        self.vectors: Dict[MemoryKey, np.ndarray] = {}
        self.arrivals: Dict[MemoryKey, np.ndarray] = {}  # the update (1, 2, ...) that stored each vector
        self.updates = 0
        self.last_step = StepStats()
        self.last_votes = Votes.none(0)
        self._labels: Dict[MemoryKey, np.ndarray] = {}
        self._refit: Optional[Future] = None  # the last update's re-clustering, running in the background
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meds-hdbscan")

    @property
    def labels(self) -> Dict[MemoryKey, np.ndarray]:
        """Each memory's labels from its last clustering (after waiting for a re-clustering still running)."""
        self.wait_for_refit()
        return self._labels

    def wait_for_refit(self) -> None:
        """Wait for the last update's background re-clustering, if any, and take its labels."""
        if self._refit is not None:
            refit, self._refit = self._refit, None
            self._labels.update(refit.result())

    def update(self, keys: Sequence[str], correct: Sequence[bool], features: np.ndarray) -> np.ndarray:
        """One visit of the step's questions: return each row's penalty term p >= 0 and remember the rows.

        ``keys`` are prompt keys, ``correct`` the outcomes, ``features`` an (N, K) array. Rows with any NaN/inf
        feature have no feature: they get p = 0 and are not stored. Rows the target excludes get p = 0 and are
        not stored either (with target "wrong", correct rollouts need no memory).
        """
        if len(keys) == 0 and np.size(features) == 0 and np.size(correct) == 0:
            self.updates += 1
            self.last_step, self.last_votes = StepStats(), Votes.none(0)
            return np.zeros(0, dtype=np.float64)
        width = next((v.shape[1] for v in self.vectors.values()), None)
        correct, features, rows = checked_step(keys, correct, features, self.config.target, width)
        # Every check is done: from here on the step changes the memory.
        self.updates += 1
        self.wait_for_refit()  # the previous step's labels (normally long done)
        votes = Votes.none(len(keys))
        touched = []
        for mkey, members in memory_groups(keys, correct, rows):
            if len(self.vectors.get(mkey, ())):  # 1. sizes, from the history only
                votes.sizes[members], votes.noise[members] = self._cluster_sizes(mkey, features[members])
                votes.sized[members] = True
            self._append(mkey, features[members])  # 2. the new rollouts join the history
            touched.append(mkey)
        # 3. Re-cluster each touched memory. The labels are read only at its next visit, so the fits run off the
        # critical path, during the trainer's PPO update; the next update (or ``labels``) waits for them.
        if touched:
            self._refit = self._executor.submit(self._fit_all, [(m, self.vectors[m]) for m in touched])
        penalties = np.zeros(len(keys), dtype=np.float64)
        penalties[rows] = penalty_term(votes.sizes[rows], self.config.alpha, self.config.penalty_cap)
        self.last_step, self.last_votes = StepStats.measure(correct, features, penalties), votes
        return penalties

    def _fit_all(self, snapshot: List[Tuple[MemoryKey, np.ndarray]]) -> Dict[MemoryKey, np.ndarray]:
        labels = {}
        for mkey, vectors in snapshot:
            try:
                labels[mkey] = cluster_labels(vectors, self.config)
            except Exception as err:  # one odd memory must not stop training: its vectors count as noise
                logger.warning(f"MEDS: HDBSCAN failed on memory {mkey} ({err!r}); its answers count as noise")
                labels[mkey] = np.full(len(vectors), -1, dtype=np.int64)
        return labels

    def _cluster_sizes(self, mkey: MemoryKey, new: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Size of the stored cluster each new vector votes for among its k nearest stored vectors (cosine), and
        whether the vote went to noise."""
        stored = self.vectors[mkey]
        labels = self._labels[mkey]
        k = min(self.config.knn_k, len(stored))
        distance = 1.0 - unit_rows(new) @ unit_rows(stored).T
        nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]  # equal distances: earlier stored first
        # Count the votes per label (column = label + 1); argmax takes the first maximum = the smallest label.
        votes = np.zeros((len(new), labels.max() + 2), dtype=np.int64)
        np.add.at(votes, (np.arange(len(new))[:, None], labels[nearest] + 1), 1)
        winner = votes.argmax(axis=1)
        sizes = np.bincount(labels + 1, minlength=votes.shape[1])[winner]
        if not self.config.noise_as_cluster:
            sizes[winner == 0] = 0
        return sizes, winner == 0

    def _append(self, mkey: MemoryKey, new: np.ndarray) -> None:
        stored = self.vectors.get(mkey, np.zeros((0, new.shape[1]), np.float32))
        arrivals = np.concatenate([self.arrivals.get(mkey, np.zeros(0, np.int64)), np.full(len(new), self.updates)])
        vectors = np.concatenate([stored, new])
        if self.config.max_per_memory is not None:
            vectors, arrivals = vectors[-self.config.max_per_memory :], arrivals[-self.config.max_per_memory :]
        self.vectors[mkey], self.arrivals[mkey] = vectors, arrivals

    def summary(self) -> Dict[str, float]:
        """Size of the whole memory: memories, stored vectors and clusters (noise excluded)."""
        return {
            "memories": len(self.vectors),
            "vectors": sum(len(v) for v in self.vectors.values()),
            "clusters": sum(int(l.max()) + 1 for l in self.labels.values() if len(l)),
        }

    def state_dict(self) -> dict:
        """The whole memory as plain Python and numpy objects (picklable, for checkpoints), sorted by key. The
        arrays are copies: editing the state never changes the memory."""
        mkeys = sorted(self.vectors)
        return {
            "version": STATE_VERSION,
            "kind": "layer_logits",
            "config": asdict(self.config),
            "keys": [k for k, _ in mkeys],
            "correct": [c for _, c in mkeys],
            "vectors": [self.vectors[m].copy() for m in mkeys],
            "labels": [self.labels[m].copy() for m in mkeys],
            "arrivals": [self.arrivals[m].copy() for m in mkeys],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the memory with one saved by ``state_dict`` (this memory keeps its own config).

        All or nothing: the whole state is checked and copied first, and a state that fails a check raises a
        ``ValueError`` naming the field, leaving the memory as it was.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an ErrorMemory state of version {STATE_VERSION}: {type(state).__name__}")
        if state.get("kind", "layer_logits") != "layer_logits":  # states from before "kind" hold layer logits
            raise ValueError(f"the saved memory keeps {state['kind']!r} (--algo.meds.feature {state['kind']}), this "
                             "run layer logits: resume with the run's own --algo.meds.feature")  # fmt: skip
        missing = [f for f in ("keys", "correct", "vectors", "labels") if f not in state]
        if missing:
            raise ValueError(f"ErrorMemory state lacks {', '.join(missing)}")
        count = len(state["keys"])
        arrivals = state.get("arrivals")
        arrivals = [None] * count if arrivals is None else list(arrivals)  # hand-made states may leave them out
        for field, values in (("correct", state["correct"]), ("vectors", state["vectors"]),
                              ("labels", state["labels"]), ("arrivals", arrivals)):  # fmt: skip
            if len(values) != count:
                raise ValueError(f"ErrorMemory state: {len(values)} {field} for {count} keys")
        vectors, labels, arrived_at, widths = {}, {}, {}, set()
        for key, ok, vecs, labs, arrived in zip(
            state["keys"], state["correct"], state["vectors"], state["labels"], arrivals
        ):
            mkey = (str(key), bool(ok))
            if mkey in vectors:
                raise ValueError(f"ErrorMemory state: memory {mkey} appears twice in keys/correct")
            vecs, labs = np.array(vecs, dtype=np.float32), np.array(labs, dtype=np.int64)
            arrived = np.zeros(len(vecs), np.int64) if arrived is None else np.array(arrived, dtype=np.int64)
            if vecs.ndim != 2 or labs.shape != (len(vecs),) or arrived.shape != (len(vecs),):
                raise ValueError(
                    f"ErrorMemory state for {key!r}: vectors {vecs.shape}, labels {labs.shape} and arrivals "
                    f"{arrived.shape} must be (n, K), (n,) and (n,)"
                )
            if len(labs) and labs.min() < -1:
                raise ValueError(f"ErrorMemory state for {key!r}: labels must be >= -1 (noise), got {labs.min()}")
            widths.add(vecs.shape[1])
            vectors[mkey], labels[mkey], arrived_at[mkey] = vecs, labs, arrived
        if len(widths) > 1:
            raise ValueError(f"ErrorMemory state: vectors of different widths {sorted(widths)}")
        self.wait_for_refit()  # a running re-clustering must finish before its memories are replaced
        self.vectors, self._labels, self.arrivals = vectors, labels, arrived_at
        self.updates = int(state.get("updates", 0))

    @staticmethod
    def merge_states(states: List[dict]) -> dict:
        """One state from states of disjoint memories (e.g. shards), in the same sorted order as ``state_dict``."""
        fields = ("keys", "correct", "vectors", "labels", "arrivals")
        rows = sorted(
            (row for state in states for row in zip(*(state[f] for f in fields))), key=lambda row: (row[0], row[1])
        )
        merged = {"version": STATE_VERSION, "kind": "layer_logits", "config": states[0]["config"] if states else {}}
        merged["updates"] = max((state.get("updates", 0) for state in states), default=0)
        merged.update({f: [row[i] for row in rows] for i, f in enumerate(fields)})
        return merged

    @staticmethod
    def split_state(state: dict, part_of, num_parts: int) -> List[dict]:
        """Split a state into ``num_parts`` states; ``part_of(prompt key)`` says where each memory goes."""
        fields = ("keys", "correct", "vectors", "labels", "arrivals")
        head = {"version": state["version"], "config": state.get("config", {}), "updates": state.get("updates", 0)}
        parts = [{**head, **{f: [] for f in fields}} for _ in range(num_parts)]
        arrivals = state.get("arrivals")
        state = dict(state, arrivals=[None] * len(state["keys"]) if arrivals is None else list(arrivals))
        for row in zip(*(state[f] for f in fields)):
            for f, value in zip(fields, row):
                parts[part_of(row[0])][f].append(value)
        return parts


class AnswerMemory:
    """MEDS with the final answer as the error pattern (``--algo.meds.feature answer``): a rollout's n is the number
    of earlier rollouts of its question, with its outcome, that gave the same answer (``answer_key``). No features,
    no clustering, so it needs no model internals; the penalty, its target and its placement are the same.

    ``update(keys, correct, answers)`` takes each row's final answer (None without one) where ``ErrorMemory``
    takes features; every row has an answer, so none is left unsized for want of one.
    """

    def __init__(self, config: Optional[MEDSConfig] = None):
        self.config = config or MEDSConfig()
        self.answers: Dict[MemoryKey, Counter] = {}  # answer key -> how many earlier rollouts gave it
        self.updates = 0
        self.last_step = StepStats()
        self.last_votes = Votes.none(0)

    def update(self, keys: Sequence[str], correct: Sequence[bool], answers: Sequence[Optional[str]]) -> np.ndarray:
        if len(answers) != len(keys):
            raise ValueError(f"update needs one answer per key: {len(keys)} keys, {len(answers)} answers")
        # The same checks as a feature memory's; one column of zeros stands for "has an answer".
        correct, _, rows = checked_step(keys, correct, np.zeros((len(keys), 1)), self.config.target, None)
        self.updates += 1
        answered = [answer_key(a) for a in answers]
        votes = Votes.none(len(keys))
        for mkey, members in memory_groups(keys, correct, rows):
            history = self.answers.setdefault(mkey, Counter())
            votes.sized[members] = bool(history)
            votes.sizes[members] = [history[answered[r]] for r in members]  # history only: then the step joins
            history.update(answered[r] for r in members)
        penalties = np.zeros(len(keys), dtype=np.float64)
        penalties[rows] = penalty_term(votes.sizes[rows], self.config.alpha, self.config.penalty_cap)
        self.last_step = StepStats.measure(correct, np.zeros((len(keys), 1)), penalties)
        self.last_votes = votes
        return penalties

    def summary(self) -> Dict[str, float]:
        """Memories, stored answers, and distinct answers (the answer memory's clusters)."""
        return {
            "memories": len(self.answers),
            "vectors": sum(sum(c.values()) for c in self.answers.values()),
            "clusters": sum(len(c) for c in self.answers.values()),
        }

    def state_dict(self) -> dict:
        mkeys = sorted(self.answers)
        return {
            "version": STATE_VERSION,
            "kind": "answer",
            "config": asdict(self.config),
            "keys": [k for k, _ in mkeys],
            "correct": [c for _, c in mkeys],
            "answers": [dict(self.answers[m]) for m in mkeys],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the memory with a saved one; all or nothing, a bad state raises ``ValueError`` naming why."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an AnswerMemory state of version {STATE_VERSION}: {type(state).__name__}")
        if state.get("kind", "layer_logits") != "answer":
            raise ValueError("the saved memory keeps layer logits (--algo.meds.feature layer_logits), this run "
                             "answers: resume with the run's own --algo.meds.feature")  # fmt: skip
        keys, correct, answers = state.get("keys", []), state.get("correct", []), state.get("answers", [])
        if not len(keys) == len(correct) == len(answers):
            raise ValueError(f"AnswerMemory state: {len(keys)} keys, {len(correct)} outcomes, {len(answers)} answers")
        loaded = {}
        for key, ok, counts in zip(keys, correct, answers):
            if not isinstance(counts, dict) or any(not isinstance(n, int) or n < 1 for n in counts.values()):
                raise ValueError(f"AnswerMemory state for {key!r}: answers must map answer keys to counts >= 1")
            loaded[(str(key), bool(ok))] = Counter(counts)
        self.answers, self.updates = loaded, int(state.get("updates", 0))
