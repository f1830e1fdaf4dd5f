"""Does MEDS keep a policy from collapsing? A seeded two-arm experiment through the real entry point, on CPU.

PROTOCOL (written 2026-11-27 before the first full run; BENCHMARKS.md §5 repeats it with the results)

Task       Two-digit additions whose units digits carry and whose tens do not (a + b; units sum >= 10, tens sum
           <= 8): 1260 questions. A response reasons in two steps and boxes the sum, e.g. for 47 + 38:
           " 7 + 8 = 15, carry 1. 4 + 3 + 1 = 8. So the answer is \\boxed{85}."
Model      The project's tiny Qwen2 (4 blocks, hidden 64, its byte-level BPE), fine-tuned by our own code on all
           1260 questions with solutions drawn 50% right, 35% with the carry dropped ("4 + 3 = 7", boxed 75) and
           15% with a units slip ("7 + 8 = 16"): partly right, with a systematic error that recurs.
Data       32 training questions (a seeded draw), revisited every episode; 64 other questions held out.
Arms       control: DAPO (group-normalised advantages, dynamic filtering of all-right/all-wrong groups,
           clip-higher 0.2/0.28, token-mean loss, no KL) with `--meds --algo.meds.alpha 0`: the penalty is 0, so
           the rewards are DAPO's, and the run logs the same diagnostics as the MEDS arm.
           meds: the same with `--algo.meds.alpha 0.1`. Both: 8 prompts x 8 rollouts per step, temperature 1,
           Adam lr 1e-4 constant, `--algo.meds.num_layers 4`, the same `--train.seed`.
Seeds      0, 1, 2 for both arms. 20 episodes (4 steps each at most; dynamic filtering replaces a dropped
           question with the next one, so an episode can be shorter).
Metrics    held out, every 5 steps: unbiased pass@1, @2, @4, @8 (8 samples per question, temperature 1);
           per step: reward, distinct wrong answers per question, share of questions whose wrong rollouts all
           give one answer, policy entropy (`--actor.entropy_coef 0`: logged, not in the loss), stored answers
           and clusters in the memory, seconds per step (steps next to an evaluation left out).
Decision   Per seed, the meds - control difference of held-out pass@1 and pass@8 at the last evaluation that
           every run reached. "MEDS helps" on a metric if all 3 differences are > 0 and their mean is > 0.02;
           "MEDS hurts" if all 3 are < 0 and the mean is < -0.02; otherwise "no effect shown" at this scale.

    python bench/collapse_ablation.py                # the whole experiment, about an hour on 2 cores
    python bench/collapse_ablation.py --quick        # 1 seed, a few steps: keeps the pipeline working

Results: bench/results/collapse_ablation.json and collapse_ablation.png (--quick: *_quick.*).
"""

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time

import numpy as np
from dapo_runs import dapo_args, questions, step_intervals, step_times, sums_model, train_ppo_ray

from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster
from meds_patch.cpu.tiny_math import write_prompts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARMS = {"control": 0.0, "meds": 0.1}
SFT_MIX = {"carry": (("right", 0.50), ("dropped_carry", 0.35), ("units_slip", 0.15))}
PASS_KS = (1, 2, 4, 8)
CURVES = {  # tag in TensorBoard -> label in the plots and the table
    "eval/eval_unbiased_pass@1": "held-out pass@1",
    "eval/eval_unbiased_pass@8": "held-out pass@8",
    "train/reward": "train reward",
    "train/meds/wrong_answers_distinct_per_question": "distinct wrong answers / question",
    "train/meds/wrong_questions_single_answer_share": "share of questions with one wrong answer",
    "train/entropy_loss": "policy entropy",
    "train/meds/stored_vectors": "stored answers",
    "train/meds/clusters": "clusters",
}


def summarise(runs, seeds, out_json, out_png):
    """The decision table, the final values with their spread, step times, and the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_eval = min(max(run["values"]["eval/eval_unbiased_pass@1"]) for run in runs.values())
    lines = [f"Held-out values at step {last_eval} (the last evaluation every run reached); mean [min, max] over "
             f"seeds {', '.join(map(str, seeds))}.", "",
             "| metric | control | meds | meds - control per seed |", "|---|---|---|---|"]  # fmt: skip
    decisions = {}
    for k in PASS_KS:
        tag = f"eval/eval_unbiased_pass@{k}"
        per_arm = {arm: [runs[(arm, s)]["values"][tag][last_eval] for s in seeds] for arm in ARMS}
        diffs = [m - c for m, c in zip(per_arm["meds"], per_arm["control"])]
        cells = [f"{np.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in per_arm.values()]
        lines.append(f"| pass@{k} | {cells[0]} | {cells[1]} | {', '.join(f'{d:+.3f}' for d in diffs)} |")
        if k in (1, 8):
            mean = float(np.mean(diffs))
            helps, hurts = all(d > 0 for d in diffs) and mean > 0.02, all(d < 0 for d in diffs) and mean < -0.02
            decisions[f"pass@{k}"] = "MEDS helps" if helps else "MEDS hurts" if hurts else "no effect shown"
    lines += ["", "| per-step metric, mean of the last 5 steps | control | meds |", "|---|---|---|"]
    for tag, label in CURVES.items():
        if tag.startswith("train/"):
            cells = []
            for arm in ARMS:
                finals = []
                for s in seeds:
                    points = runs[(arm, s)]["values"].get(tag, {})
                    finals.append(np.mean([points[i] for i in sorted(points)[-5:]]) if points else float("nan"))
                cells.append(f"{np.mean(finals):.3f} [{min(finals):.3f}, {max(finals):.3f}]")
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    times = {arm: [t for s in seeds for t in runs[(arm, s)]["step_seconds"]] for arm in ARMS}
    step_s = {arm: statistics.median(t) if t else float("nan") for arm, t in times.items()}
    # Both arms run the MEDS glue, so their ratio is the cost of alpha > 0 alone; the controller's MEDS seconds
    # (memory update and penalties, on the trainer's critical path) say what MEDS itself adds to a step.
    controller = {
        arm: statistics.median(
            x for s in seeds for x in runs[(arm, s)]["values"].get("train/meds/controller_seconds", {}).values()
        )
        for arm in ARMS
    }
    lines += ["", f"Median seconds per step: control {step_s['control']:.2f}, meds {step_s['meds']:.2f} "
              f"({100 * (step_s['meds'] / step_s['control'] - 1):+.1f}%). MEDS work on the controller's critical "
              f"path, median per step: control {controller['control']:.3f} s, meds {controller['meds']:.3f} s "
              f"({100 * controller['meds'] / step_s['meds']:.1f}% of a meds step)."]  # fmt: skip
    lines += ["", "Decision (protocol): " + "; ".join(f"{k}: {v}" for k, v in decisions.items())]

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (tag, label) in zip(axes.flat, CURVES.items()):
        for arm, color in zip(ARMS, ("tab:gray", "tab:blue")):
            common = sorted(set.intersection(*(set(runs[(arm, s)]["values"].get(tag, {})) for s in seeds)))
            if not common:
                continue
            table = np.array([[runs[(arm, s)]["values"][tag][i] for i in common] for s in seeds])
            ax.plot(common, table.mean(0), color=color, label=f"{arm} (mean of {len(seeds)})")
            ax.fill_between(common, table.min(0), table.max(0), color=color, alpha=0.2)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.suptitle("DAPO with MEDS (alpha 0.1) vs without (alpha 0), tiny Qwen2 on carry additions; band: min-max")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    report = "\n".join(lines)
    with open(out_json, "w") as fh:
        json.dump({"seeds": seeds, "last_eval_step": last_eval, "decisions": decisions, "step_seconds": step_s,
                   "table": report, "runs": {f"{a}-{s}": r for (a, s), r in runs.items()}}, fh, indent=1)  # fmt: skip
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 episode (4 steps at most): a smoke test")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--results", default=RESULTS, help="where the JSON and the plot go (default: bench/results)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.episodes, args.eval_steps = [0], 1, 3
    suffix = "_quick" if args.quick else ""
    start = time.time()
    print("preparing the fine-tuned model (cached after the first time) ...", flush=True)
    model = sums_model("carry-qwen2", SFT_MIX)
    pairs = questions("carry")
    random.Random(0).shuffle(pairs)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="meds-ablation-"))
    os.makedirs(work, exist_ok=True)
    write_prompts(os.path.join(work, "train.jsonl"), pairs[:32])
    write_prompts(os.path.join(work, "heldout.jsonl"), pairs[32:96])
    runs = {}
    try:
        with LocalRayCluster(env=CPU_ENV) as cluster:
            for seed in args.seeds:
                for arm, alpha in ARMS.items():
                    folder = os.path.join(work, f"{arm}-{seed}")
                    print(f"[{time.time() - start:.0f} s] {arm}, seed {seed} ...", flush=True)
                    argv = dapo_args(
                        model, folder, seed=seed, episodes=args.episodes, run_name="ablation", alpha=alpha,
                        eval_steps=args.eval_steps, eval_samples=max(PASS_KS),
                    )  # fmt: skip
                    values = train_ppo_ray(cluster, argv, folder)
                    step_seconds = step_intervals(step_times(folder), args.eval_steps)
                    runs[(arm, seed)] = {"values": values, "step_seconds": step_seconds}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.results, exist_ok=True)
    out_json = os.path.join(args.results, f"collapse_ablation{suffix}.json")
    report = summarise(runs, args.seeds, out_json, os.path.join(args.results, f"collapse_ablation{suffix}.png"))
    print(report)
    print(f"done in {time.time() - start:.0f} s; {out_json}")


if __name__ == "__main__":
    main()
