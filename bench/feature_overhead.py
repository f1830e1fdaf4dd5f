"""CPU cost of reading MEDS answer-token features during the trainer's log-prob forward.

A random Qwen2-shaped model (28 blocks; hidden/vocab ratio of Qwen2.5-7B; GQA; sdpa; float32) runs the forward that
OpenRLHF's experience maker runs in the three variants of bench/feature_forward.py: plain, hooks (the shipped
meds_patch.core.features.AnswerHiddenStates) and hidden_states (output_hidden_states=True, as the authors' code).

Each variant runs in its own process (this script re-invokes itself with --variant), `--rounds` times interleaved.
Reported: median wall time of forward + log-probs + features, and the peak RSS the forward adds over the RSS after
building the model and inputs and one warm-up step (VmHWM, reset then), taken from one more process per variant in
which glibc returns all freed memory at once (see `launch`). Every variant is checked to compute the same log-probs,
and hooks and hidden_states the same features. Linux only (reads /proc/self).

    python bench/feature_overhead.py [--layers 28 --hidden 512 --vocab 21760 --batch 4 --seq 512 --k 14]
                                     [--repeats 5 --rounds 3] [--quick] [--out FILE]
"""

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from feature_forward import VARIANTS, build_model, make_batch, proc_status_kib, reset_peak_rss, step, table

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = dict(layers=16, hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=2720, batch=2, seq=64)
QUICK.update(repeats=2, rounds=1, threads=1)
MMAP_THRESHOLD = 64 * 1024


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=512)
    # 2.75 x hidden; Qwen2.5-7B itself has 18944 / 3584 = 5.3 x (use --intermediate 2688 for that, ~2x slower).
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=21760)  # 512 / 21760 ~ 3584 / 152064
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--k", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set on the child processes
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
        args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS / ("feature_overhead_quick.json" if args.quick else "feature_overhead.json")
    return args


# ---------------------------------------------------------------- child: one variant in a fresh process


def run_child(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
    )
    model = build_model(shape, args.seed)
    batch = make_batch(args.batch, args.seq, args.vocab, "cpu", args.seed)
    built_kib = proc_status_kib("VmRSS")
    with torch.no_grad():
        step(args.variant, model, batch, args.k)  # warm-up; what it allocates once and keeps counts as baseline
        gc.collect()
        baseline_kib = proc_status_kib("VmRSS")
        # Without the reset, the peak would still hold model construction. It is read from VmHWM: ru_maxrss also
        # carries the parent's peak over the vfork + exec that started this process.
        reset_peak_rss()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            log_probs, features, own = step(args.variant, model, batch, args.k)
            times.append(time.perf_counter() - start)
    peak_kib = proc_status_kib("VmHWM")
    return dict(
        variant=args.variant,
        threads=torch.get_num_threads(),
        times_s=times,
        median_s=statistics.median(times),
        built_rss_mib=built_kib / 1024,
        baseline_rss_mib=baseline_kib / 1024,
        peak_rss_mib=peak_kib / 1024,
        forward_peak_mib=(peak_kib - baseline_kib) / 1024,
        ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        log_prob_sum=float(log_probs.double().sum()),
        own_logit=own.tolist(),
        features=None if features is None else features.tolist(),
    )


# ---------------------------------------------------------------- parent: launch children, check, summarise


def launch(variant, exact_memory=False):
    """Start one child. With exact_memory, glibc serves every allocation over 64 KiB by mmap and returns it on free,
    so RSS follows the live tensors exactly; by default its reuse of freed heap memory makes peaks vary by +-50 MiB
    between identical runs, but the page faults of the mmap mode slow the forward by ~40%: time is measured apart."""
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)) if exact_memory else None
    if exact_memory:
        command += ["--repeats", "1"]
    command += ["--variant", variant]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(process):
    stdout, stderr = process.communicate()
    if process.returncode:
        sys.exit(f"child {process.args[-1]} failed ({process.returncode}):\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def check_equal_work(runs):
    """Every variant did the same forward; hooks and hidden_states read the same features."""
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)  # noqa: E731
    first = {run["variant"]: run for run in reversed(runs)}
    for run in runs:
        assert close(run["log_prob_sum"], first["plain"]["log_prob_sum"]), f"{run['variant']} log-probs differ"
    for variant in ("hooks", "hidden_states"):
        for row, own in zip(first[variant]["features"], first[variant]["own_logit"]):
            assert close(row[-1], own), f"{variant}: last-layer feature {row[-1]} != model logit {own}"
    pairs = list(zip(sum(first["hooks"]["features"], []), sum(first["hidden_states"]["features"], [])))
    worst = max(abs(a - b) for a, b in pairs)
    assert all(close(a, b) for a, b in pairs), f"hooks and hidden_states features differ by up to {worst}"
    return worst


def summarise(timing, memory):
    summary = {}
    for variant in VARIANTS:
        timed = [run for run in timing if run["variant"] == variant]
        sized = [run for run in memory if run["variant"] == variant]
        summary[variant] = dict(
            median_s=statistics.median(run["median_s"] for run in timed),
            forward_peak_mib=statistics.median(run["forward_peak_mib"] for run in sized),
            forward_peak_mib_default_malloc=statistics.median(run["forward_peak_mib"] for run in timed),
            baseline_rss_mib=statistics.median(run["baseline_rss_mib"] for run in sized),
        )
    return summary


def main():
    args = parse_args()
    if args.variant:
        print(json.dumps(run_child(args)))
        return
    if args.quick:  # the smoke test's timings mean nothing: one set of children, side by side, one thread each
        processes = [launch(variant, exact_memory=True) for variant in VARIANTS]
        timing = memory = [collect(process) for process in processes]
    else:
        timing = [collect(launch(variant)) for _ in range(args.rounds) for variant in VARIANTS]
        memory = [collect(launch(variant, exact_memory=True)) for variant in VARIANTS]  # deterministic: once
    runs = timing if args.quick else timing + memory
    worst = check_equal_work(runs)
    summary = summarise(timing, memory)
    shape = {key: value for key, value in vars(args).items() if key not in ("variant", "out")}
    print(f"shape: {shape}, torch threads: {runs[0]['threads']}")
    print(f"features: hooks == hidden_states (max |diff| {worst:.2e}); last layer == the model's own logit\n")
    print(table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(config=shape, summary=summary, runs=runs), indent=1) + "\n")
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
