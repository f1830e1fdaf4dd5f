"""Rollouts per second of examples/reward_func_math.py: math-verify in the calling thread (before issue 9) against
the process pool with a per-answer limit (now), on the same ordinary answers, side by side.

The answers mix integers, fractions, \\dfrac, intervals, sets, units, text, two boxes and no box, right and wrong,
with numbers varied per rollout. "one call per rollout" is how OpenRLHF 0.11.2 calls the function (one rollout
per call, all in flight through asyncio.to_thread); "one call for all" passes every rollout in one call. Each
figure is the median of --repeats runs; the pool is started before timing (its start-up is printed apart).

    python bench/reward_throughput.py [--answers 1000 --repeats 5] [--quick]
"""

import argparse
import asyncio
import importlib.util
import os
import statistics
import time

from meds_patch.cpu.cluster import REWARD_FUNC  # the package's reward file, which the demo hands to OpenRLHF

PROMPT = "Solve and put the final answer in \\boxed{}. "


def load_reward_module():
    """The reward file, loaded by path as OpenRLHF loads it."""
    spec = importlib.util.spec_from_file_location("reward_func", REWARD_FUNC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ordinary_rollouts(count):
    """(response, label) pairs of the kinds the tests grade, numbers varied with the index."""
    kinds = [
        lambda n: (f"so \\boxed{{{n}}}", str(n)),
        lambda n: (f"so \\boxed{{{n + 1}}}", str(n)),
        lambda n: (f"so \\boxed{{\\frac{{{n}}}{{{n + 1}}}}}", f"{n}/{n + 1}"),
        lambda n: (f"so \\boxed{{\\dfrac{{1}}{{{n + 2}}}}}", f"\\frac{{1}}{{{n + 2}}}"),
        lambda n: (f"so \\boxed{{[{n}, {n + 3})}}", f"[{n},{n + 3})"),
        lambda n: (f"so \\boxed{{\\{{{n}, {n + 1}\\}}}}", f"\\{{{n + 1}, {n}\\}}"),
        lambda n: (f"so \\boxed{{{n}\\text{{ cm}}}}", str(n)),
        lambda n: ("so \\boxed{\\text{Monday}}", "Monday" if n % 2 else "Friday"),
        lambda n: (f"first \\boxed{{{n - 1}}}, no: \\boxed{{{n}}}", str(n)),
        lambda n: (f"so the answer is {n}", str(n)),
    ]
    return [kinds[i % len(kinds)](i // len(kinds) + 2) for i in range(count)]


def rollouts_per_second(reward_func, rollouts, per_rollout):
    queries = [PROMPT + response for response, _ in rollouts]
    labels = [label for _, label in rollouts]
    start = time.perf_counter()
    if per_rollout:

        async def all_in_flight():
            calls = (
                asyncio.to_thread(reward_func, [query], [PROMPT], [label]) for query, label in zip(queries, labels)
            )
            return await asyncio.gather(*calls)

        rewards = [result["rewards"].item() for result in asyncio.run(all_in_flight())]
    else:
        rewards = reward_func(queries, [PROMPT] * len(queries), labels)["rewards"].tolist()
    return len(rollouts) / (time.perf_counter() - start), rewards


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="few answers, two repeats: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.answers, args.repeats = 40, 2
    from meds_patch.tools.math_reward import DEFAULT_MAX_WORKERS, is_correct

    pool_version = load_reward_module()
    thread_version = load_reward_module()
    # Before issue 9: the same function with math-verify run in the calling thread, without a time limit.
    thread_version.judge = lambda answers, labels: (
        [answer is not None and is_correct(answer, str(label)) for answer, label in zip(answers, labels)],
        [False] * len(answers),
    )
    rollouts = ordinary_rollouts(args.answers)
    start = time.perf_counter()
    pool_version.reward_func(["\\boxed{1}"], [""], ["1"])
    workers = os.environ.get("MEDS_REWARD_WORKERS", min(DEFAULT_MAX_WORKERS, os.cpu_count()))
    print(f"pool start-up (first call): {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, {workers} workers")
    columns = "in the thread (rollouts/s) | process pool (rollouts/s) | same rewards | correct"
    print(f"| {args.answers} ordinary answers | {columns} |")
    print("|---|---:|---:|---|---:|")
    for name, per_rollout in (("one call per rollout (OpenRLHF)", True), ("one call for all", False)):
        speeds = {"thread": [], "pool": []}
        rewards = {}
        for _ in range(args.repeats):
            for version, module in (("thread", thread_version), ("pool", pool_version)):
                speed, rewards[version] = rollouts_per_second(module.reward_func, rollouts, per_rollout)
                speeds[version].append(speed)
        thread, pool = (statistics.median(speeds[version]) for version in ("thread", "pool"))
        same = rewards["thread"] == rewards["pool"]
        print(f"| {name} | {thread:.0f} | {pool:.0f} | {same} | {sum(rewards['pool']) / len(rollouts):.0%} |")


if __name__ == "__main__":
    main()
