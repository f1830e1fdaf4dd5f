"""Time per response of the two answer searches (``--algo.meds.anchor_search tokens | text``).

Rows are a short prompt and a response of --tokens tokens of running arithmetic that ends with
" so the answer is \\boxed{7}." (box) or " so the answer is 7." (no box), tokenized by the project's tiny
byte-level BPE (no tokenizer download here; decoding cost per token is that of the same Rust ByteLevel decoder
that Qwen's tokenizer uses). Each search runs on the same batch --repeats times; the median per row is reported.

    python bench/answer_search.py [--tokens 512 4096 --batch 16 --repeats 7] [--quick]
"""

import argparse
import statistics
import time

import torch

from meds_patch import find_answer_positions
from meds_patch.cpu.tiny_math import tiny_tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="short rows, few repeats: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.batch, args.repeats = [64], 2, 2
    tokenizer = tiny_tokenizer()

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    prompt = encode("Question: what is 3 + 4?")
    print("| response tokens | ends with | tokens search (ms/row) | text search (ms/row) | same position |")
    print("|---:|---|---:|---:|---|")
    for length in args.tokens:
        for name, ending in (("box", " so the answer is \\boxed{7}."), ("no box", " so the answer is 7.")):
            end = encode(ending)
            body = (encode(" 3 + 4 = 7, and") * length)[: length - len(end)]
            sequences = torch.tensor([prompt + body + end] * args.batch)
            start = torch.full((args.batch,), len(prompt))
            medians, positions = {}, {}
            for search in ("tokens", "text"):
                times = []
                for _ in range(args.repeats):
                    begin = time.perf_counter()
                    positions[search] = find_answer_positions(sequences, start, tokenizer, search=search)
                    times.append((time.perf_counter() - begin) / args.batch)
                medians[search] = 1e3 * statistics.median(times)
            same = bool((positions["tokens"] == positions["text"]).all())
            print(f"| {length} | {name} | {medians['tokens']:.2f} | {medians['text']:.2f} | {same} |")


if __name__ == "__main__":
    main()
