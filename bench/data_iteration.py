"""Rows per second of the training-set build over DAPO-Math-17K's layout: iterating the ``datasets.Dataset`` row by
row versus ``meds_patch.tools.data.dataset_rows`` (decoded a batch at a time).

The rows are synthetic, in DAPO's column layout (a chat-message list, two structs), with a question of about 400
characters inside DAPO's instruction; every question repeats --repeat-each times, as DAPO's do (about 100). Each
way runs over the same Dataset --repeats times; the median is reported.

    python bench/data_iteration.py [--rows 50000 --repeats 3] [--quick]
"""

import argparse
import statistics
import time

import datasets

from meds_patch.tools.data import DAPO_PREFIX, DAPO_SUFFIX, TRAIN_SOURCES, dataset_rows, training_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat-each", type=int, default=100, help="rows per distinct question")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few rows, one repeat: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 2_000, 1
    question = "In triangle $ABC$ with $AB = {0}$, find the length of the altitude from $C$. " * 5
    table = datasets.Dataset.from_list(
        [
            {
                "data_source": "math_dapo",
                "prompt": [
                    {"content": DAPO_PREFIX + question.format(i // args.repeat_each) + DAPO_SUFFIX, "role": "user"}
                ],
                "ability": "MATH",
                "reward_model": {"ground_truth": str(i // args.repeat_each), "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"id-{i // args.repeat_each}"},
            }
            for i in range(args.rows)
        ]
    )
    ways = {
        "row by row (for row in dataset)": lambda: table,
        "dataset_rows (batches of 10,000)": lambda: dataset_rows(table),
    }
    rates = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, rows in ways.items():  # interleaved, so drifting machine load hits both alike
            start = time.perf_counter()
            kept, _ = training_rows([(TRAIN_SOURCES[0], rows())], {})
            rates[name].append(args.rows / (time.perf_counter() - start))
    print(f"{args.rows} rows, {len(kept)} distinct questions, median of {args.repeats}")
    print("| iteration | rows/s | 1.79M rows (s) |")
    print("|---|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {1_791_700 / rate:,.0f} |")


if __name__ == "__main__":
    main()
