"""--algo.meds.num_workers: the memory spread over Ray actors gives exactly the in-process results."""

import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest

from meds_patch import ErrorMemory, MEDSConfig
from meds_patch.integration.glue import restore_memory
from meds_patch.integration.sharded import ShardedErrorMemory, shard_of
from tests.inprocess import parse_train_args
from tests.test_openrlhf_glue import MEDS_ARGS


def steps(seed: int, count: int = 3, rows: int = 96):
    rng = np.random.default_rng(seed)
    keys = [f"question {i % 12}" for i in range(rows)]
    for _ in range(count):
        yield keys, rng.random(rows) < 0.4, rng.standard_normal((rows, 6)).astype(np.float32)


def assert_same_state(a: dict, b: dict):
    assert a["keys"] == b["keys"] and a["correct"] == b["correct"]
    for x, y in zip(a["vectors"] + a["labels"], b["vectors"] + b["labels"]):
        np.testing.assert_array_equal(x, y)


def kill_and_wait_for_restart(ray, sharded, index: int) -> None:
    """Kill a shard and return once Ray has restarted it (a fresh, empty actor answers)."""
    old = ray.get(sharded.shards[index].run.remote("summary"))[1]
    ray.kill(sharded.shards[index], no_restart=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if ray.get(sharded.shards[index].run.remote("summary"))[1] != old:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        time.sleep(0.2)
    raise TimeoutError("the shard was not restarted")


def test_the_trainer_start_creates_the_shard_actors(local_ray):
    # restore_memory runs when the trainer starts, before the first step, with or without a checkpoint.
    args = parse_train_args([*MEDS_ARGS, "--algo.meds.num_workers", "2"])
    maker = SimpleNamespace(args=args)
    restore_memory(maker, {"global_step": 0})
    assert isinstance(maker.meds_state.memory, ShardedErrorMemory) and len(maker.meds_state.memory.shards) == 2
    assert maker.meds_state.memory.summary()["memories"] == 0


def test_shards_split_the_questions():
    owners = {shard_of(f"question {i}", 2) for i in range(12)}
    assert owners == {0, 1} and shard_of("question 3", 2) == shard_of("question 3", 2)


def test_sharded_memory_gives_the_in_process_penalties_and_state(local_ray):
    local, sharded = ErrorMemory(MEDSConfig()), ShardedErrorMemory(MEDSConfig(), num_workers=2)
    for keys, correct, features in steps(0):
        np.testing.assert_array_equal(local.update(keys, correct, features), sharded.update(keys, correct, features))
        assert asdict(sharded.last_step) == pytest.approx(asdict(local.last_step))
    assert sharded.summary() == local.summary()
    assert_same_state(local.state_dict(), sharded.state_dict())


def test_sharded_memory_restores_a_checkpoint_state(local_ray):
    local = ErrorMemory(MEDSConfig())
    for batch in steps(1):
        local.update(*batch)
    sharded = ShardedErrorMemory(MEDSConfig(), num_workers=2)
    sharded.load_state_dict(local.state_dict())
    assert_same_state(local.state_dict(), sharded.state_dict())
    for batch in steps(2, count=1):
        np.testing.assert_array_equal(local.update(*batch), sharded.update(*batch))


def test_a_dead_shard_comes_back_with_the_last_checkpoint(local_ray, caplog):
    sharded, reference = ShardedErrorMemory(MEDSConfig(), num_workers=2), ErrorMemory(MEDSConfig())
    batches = list(steps(3, count=3))
    for batch in batches[:2]:
        sharded.update(*batch)
        reference.update(*batch)
    checkpoint = sharded.state_dict()  # what a checkpoint save takes
    kill_and_wait_for_restart(local_ray, sharded, 0)
    penalties = sharded.update(*batches[2])
    np.testing.assert_array_equal(penalties, reference.update(*batches[2]))
    assert "memory shard 0 restarted and got back the state of the last checkpoint" in caplog.text
    restored = ErrorMemory(MEDSConfig())
    restored.load_state_dict(checkpoint)
    restored.update(*batches[2])
    assert_same_state(restored.state_dict(), sharded.state_dict())


def test_a_checkpoint_after_a_shard_restart_still_holds_the_restored_memory(local_ray):
    sharded = ShardedErrorMemory(MEDSConfig(), num_workers=2)
    for batch in steps(4, count=2):
        sharded.update(*batch)
    checkpoint = sharded.state_dict()
    kill_and_wait_for_restart(local_ray, sharded, 1)
    assert_same_state(checkpoint, sharded.state_dict())


def keys_of_shard(index: int, count: int, shards: int = 2) -> list:
    return [k for k in (f"question {i}" for i in range(100)) if shard_of(k, shards) == index][:count]


def test_a_rejected_step_changes_no_shard(local_ray):
    sharded = ShardedErrorMemory(MEDSConfig(), num_workers=2)
    sharded.update(keys_of_shard(0, 3), np.zeros(3, bool), np.ones((3, 6), np.float32))  # shard 1 holds nothing
    before = sharded.state_dict()
    keys = keys_of_shard(0, 2) + keys_of_shard(1, 2)
    with pytest.raises(ValueError, match="5 values per row, the memory holds 6"):
        sharded.update(keys, np.zeros(4, bool), np.ones((4, 5), np.float32))
    after = sharded.state_dict()
    assert_same_state(before, after)
    assert after["updates"] == before["updates"] == 1


def test_every_shard_counts_every_step_as_the_in_process_memory_does(local_ray):
    local, sharded = ErrorMemory(MEDSConfig()), ShardedErrorMemory(MEDSConfig(), num_workers=2)
    rng = np.random.default_rng(5)
    for keys in (keys_of_shard(0, 2) + keys_of_shard(1, 2), keys_of_shard(0, 4), keys_of_shard(1, 4)):
        batch = (keys, np.zeros(len(keys), bool), rng.standard_normal((len(keys), 6)).astype(np.float32))
        local.update(*batch)
        sharded.update(*batch)
    a, b = local.state_dict(), sharded.state_dict()
    assert b["updates"] == a["updates"] == 3
    for x, y in zip(a["arrivals"], b["arrivals"]):
        np.testing.assert_array_equal(x, y)


def test_a_bad_state_loads_into_no_shard(local_ray):
    sharded = ShardedErrorMemory(MEDSConfig(), num_workers=2)
    for batch in steps(6, count=1):
        sharded.update(*batch)
    before = sharded.state_dict()
    state = sharded.state_dict()
    state["labels"][-1] = np.zeros(len(state["labels"][-1]) + 1, np.int64)
    with pytest.raises(ValueError, match="vectors"):
        sharded.load_state_dict(state)
    assert_same_state(before, sharded.state_dict())


def test_a_shard_restarted_before_any_checkpoint_says_it_is_empty(local_ray, caplog):
    sharded = ShardedErrorMemory(MEDSConfig(), num_workers=2)
    sharded.update(*next(steps(7, count=1)))
    kill_and_wait_for_restart(local_ray, sharded, 1)
    sharded.summary()
    assert "memory shard 1 restarted with no checkpoint to restore: it is empty" in caplog.text


def test_a_shard_that_cannot_be_created_fails_at_once_with_rays_reason(local_ray):
    # A two-element array as config: ErrorMemory's `config or MEDSConfig()` raises inside the actor's constructor.
    sharded = ShardedErrorMemory(np.array([1, 2]), num_workers=1)
    with pytest.raises(RuntimeError, match="(?s)memory shard 0 could not be created.*truth value of an array"):
        sharded.summary()
