"""Controller time of one MEDS step at paper scale: 512 prompts x 16 rollouts, about half wrong, K = 14.

Memories are first filled with `--epochs` visits of every prompt; the median of `--repeats` further steps is
printed. Features are synthetic: each question has a few recurring error modes plus noise, as a policy that
repeats its mistakes would produce.

    python bench/controller_step.py [--prompts 512] [--rollouts 16] [--epochs 10] [--max-per-memory N]
"""

import argparse
import statistics
import time

import numpy as np

from meds_patch import ErrorMemory, MEDSConfig


def synthetic_step(rng, prompts, rollouts, k, modes):
    keys = [f"question-{i}" for i in range(prompts) for _ in range(rollouts)]
    correct = rng.random(prompts * rollouts) < 0.5
    mode = rng.integers(0, modes.shape[1], size=prompts * rollouts)
    features = modes[np.repeat(np.arange(prompts), rollouts), mode] + 0.3 * rng.standard_normal((len(keys), k))
    return keys, correct, features.astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-per-memory", type=int, default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    modes = 5.0 * rng.standard_normal((args.prompts, 4, args.layers))  # 4 error modes per question
    memory = ErrorMemory(MEDSConfig(num_layers=args.layers, max_per_memory=args.max_per_memory))
    for _ in range(args.epochs):
        memory.update(*synthetic_step(rng, args.prompts, args.rollouts, args.layers, modes))
    times = []
    for _ in range(args.repeats):
        batch = synthetic_step(rng, args.prompts, args.rollouts, args.layers, modes)
        start = time.perf_counter()
        memory.update(*batch)
        times.append(time.perf_counter() - start)
    summary = memory.summary()
    print(
        f"prompts={args.prompts} rollouts={args.rollouts} K={args.layers} history_epochs={args.epochs} "
        f"max_per_memory={args.max_per_memory}: median controller time per step {statistics.median(times):.3f} s "
        f"({summary['memories']} memories, {summary['vectors']} vectors, {summary['clusters']} clusters)"
    )


if __name__ == "__main__":
    main()
