"""The error memory spread over Ray actors by prompt key, for runs that outgrow one controller process.

Memories of different questions never interact, so each shard runs the plain ``ErrorMemory`` on its own keys and
the results are exactly those of one in-process memory. Ray restarts a shard that dies; the shard then gets back
the state of the last checkpoint (saved or restored through this object) and the step is retried once.
"""

import logging
import time
import uuid
import zlib
from typing import Dict, List, Optional, Sequence

import numpy as np
import ray

from meds_patch.core.config import MEDSConfig
from meds_patch.core.memory import ErrorMemory, StepStats, Votes, checked_step

logger = logging.getLogger(__name__)
RESTART_TIMEOUT_S = 300


def shard_of(key: str, num_shards: int) -> int:
    """A stable shard for a prompt key: the same in every process and across restarts (unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8")) % num_shards


class MemoryShard(ErrorMemory):
    """A shard actor's memory. ``run`` also returns an id of this incarnation of the actor, so the caller notices a
    restart even when Ray replays a call on the new actor."""

    def __init__(self, config: MEDSConfig):
        super().__init__(config)
        self.incarnation = uuid.uuid4().hex

    def run(self, method: str, *args):
        return getattr(self, method)(*args), self.incarnation

    def update_with_votes(self, *args):
        return self.update(*args), self.last_votes


class ShardedErrorMemory:
    """``ErrorMemory``'s interface over ``num_workers`` Ray actors (one CPU each, spread over the cluster)."""

    def __init__(self, config: MEDSConfig, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.config = config
        shard_class = ray.remote(num_cpus=1, max_restarts=-1, scheduling_strategy="SPREAD")(MemoryShard)
        self.shards = [shard_class.remote(config) for _ in range(num_workers)]
        self.incarnations: List[Optional[str]] = [None] * num_workers
        self.restore_points: List[Optional[ray.ObjectRef]] = [None] * num_workers
        self.last_step = StepStats()
        self.last_votes = Votes.none(0)
        self.width: Optional[int] = None  # the feature width the shards hold, once they hold any

    def _call(self, index: int, method: str, *args, ref: Optional[ray.ObjectRef] = None):
        """Run ``method`` on a shard. A restarted actor starts empty: before it answers anything, load the last
        checkpoint state into it and run the call again. Waits up to RESTART_TIMEOUT_S for Ray to restart it."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                result, incarnation = ray.get(ref or self.shards[index].run.remote(method, *args))
                if self.incarnations[index] in (None, incarnation):
                    self.incarnations[index] = incarnation
                    return result
                if self.restore_points[index] is not None:
                    ray.get(self.shards[index].run.remote("load_state_dict", self.restore_points[index]))
                    logger.warning(
                        f"MEDS: memory shard {index} restarted and got back the state of the last checkpoint; "
                        "what it stored since then is lost"
                    )
                else:
                    logger.warning(f"MEDS: memory shard {index} restarted with no checkpoint to restore: it is empty")
                self.incarnations[index] = incarnation
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                if getattr(err, "actor_init_failed", False):  # its constructor raised: a restart would too
                    raise RuntimeError(f"MEDS: memory shard {index} could not be created: {err}") from err
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            ref = None

    def update(self, keys: Sequence[str], correct: Sequence[bool], features: np.ndarray) -> np.ndarray:
        # Checked here, as one in-process memory would check it, before any shard sees it: a step is taken by every
        # shard or by none. Every shard takes part in every step (maybe with no row), so each one counts the same
        # updates and stamps the same arrival numbers as the in-process memory.
        if len(keys) == 0 and np.size(features) == 0 and np.size(correct) == 0:
            correct, features, rows = np.zeros(0, bool), np.zeros((0, self.width or 1), np.float32), np.zeros(0, int)
        else:
            correct, features, rows = checked_step(keys, correct, features, self.config.target, self.width)
        owner = np.array([shard_of(k, len(self.shards)) for k in keys], dtype=np.int64)
        jobs = []
        for index in range(len(self.shards)):
            mine = np.flatnonzero(owner == index)
            args = ([keys[r] for r in mine], correct[mine], features[mine])
            jobs.append((mine, args, self.shards[index].run.remote("update_with_votes", *args)))  # all at once
        penalties, votes = np.zeros(len(keys), dtype=np.float64), Votes.none(len(keys))
        for index, (mine, args, ref) in enumerate(jobs):
            penalties[mine], shard_votes = self._call(index, "update_with_votes", *args, ref=ref)
            for mine_in_all, values in zip(votes, shard_votes):
                mine_in_all[mine] = values
        if rows.size:
            self.width = features.shape[1]
        self.last_step, self.last_votes = StepStats.measure(correct, features, penalties), votes
        return penalties

    def summary(self) -> Dict[str, float]:
        parts = [self._call(i, "summary") for i in range(len(self.shards))]
        return {name: sum(part[name] for part in parts) for name in parts[0]}

    def state_dict(self) -> dict:
        """The merged state, identical to an in-process memory's; also the shards' restore point."""
        parts = [self._call(i, "state_dict") for i in range(len(self.shards))]
        self.restore_points = [ray.put(part) for part in parts]
        return ErrorMemory.merge_states(parts)

    def load_state_dict(self, state: dict) -> None:
        """All or nothing: the state is checked in full here (by loading it into a throwaway in-process memory)
        before any shard is touched."""
        check = ErrorMemory(self.config)
        check.load_state_dict(state)
        parts = ErrorMemory.split_state(state, lambda key: shard_of(key, len(self.shards)), len(self.shards))
        self.restore_points = [ray.put(part) for part in parts]
        for index, ref in enumerate(self.restore_points):
            self._call(index, "load_state_dict", ref)
        self.width = next((v.shape[1] for v in check.vectors.values()), None)
