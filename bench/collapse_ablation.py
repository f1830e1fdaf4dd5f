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
import hashlib
import inspect
import json
import os
import random
import shutil
import statistics
import tempfile
import time

import numpy as np

from meds_patch.cpu.demo import CPU_ENV, REWARD_FUNC, LocalRayCluster, submit
from meds_patch.cpu.tiny_math import cache_root, fine_tune, tiny_model, tiny_tokenizer, write_prompts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARMS = {"control": 0.0, "meds": 0.1}
SFT_MODES = (("right", 0.50), ("dropped_carry", 0.35), ("units_slip", 0.15))
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


def carry_questions():
    return [
        (10 * a1 + a0, 10 * b1 + b0)
        for a1 in range(1, 9) for b1 in range(1, 9) if a1 + b1 <= 8
        for a0 in range(1, 10) for b0 in range(1, 10) if a0 + b0 >= 10
    ]  # fmt: skip


def solution(a: int, b: int, mode: str) -> str:
    units, tens = a % 10 + b % 10, a // 10 + b // 10
    if mode == "right":
        steps, total = f"{units}, carry 1. {a // 10} + {b // 10} + 1 = {tens + 1}", a + b
    elif mode == "dropped_carry":
        steps, total = f"{units}. {a // 10} + {b // 10} = {tens}", a + b - 10
    else:  # units_slip: one too many in the units, the rest done right
        steps, total = f"{units + 1}, carry 1. {a // 10} + {b // 10} + 1 = {tens + 1}", a + b + 1
    return f" {a % 10} + {b % 10} = {steps}. So the answer is \\boxed{{{total}}}."


def carry_model(steps: int = 1200) -> str:
    """The fine-tuned model's folder, built once and cached by the source of what builds it and ``steps``."""
    from meds_patch.cpu.tiny_math import PROMPT

    recipe = [inspect.getsource(f) for f in (carry_questions, solution, carry_model, fine_tune, tiny_model)]
    key = hashlib.sha256(repr((recipe, SFT_MODES, PROMPT, steps)).encode()).hexdigest()[:12]
    target = os.path.join(cache_root(), f"carry-qwen2-{key}")
    if os.path.isdir(target):
        return target
    rng = random.Random(0)
    modes, weights = zip(*SFT_MODES)
    corpus = [
        PROMPT.format(a=a, b=b) + solution(a, b, rng.choices(modes, weights)[0])
        for a, b in carry_questions()
        for _ in range(8)
    ]
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    model = tiny_model(tokenizer)
    fine_tune(model, tokenizer, steps, batch_size=32, corpus=corpus)
    tokenizer.padding_side = "left"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(dir=cache_root())  # renamed into place: no half-built model is ever cached
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_args(model, folder, seed, alpha, episodes, eval_steps):
    return [
        "--actor.model_name_or_path", model, "--reward.remote_url", REWARD_FUNC,
        "--data.prompt_dataset", os.path.join(folder, "..", "train.jsonl"),
        "--data.input_key", "prompt", "--data.label_key", "label",
        "--eval.dataset", os.path.join(folder, "..", "heldout.jsonl"), "--eval.steps", str(eval_steps),
        "--eval.n_samples_per_prompt", str(max(PASS_KS)), "--eval.temperature", "1.0",
        "--data.max_len", "160", "--rollout.max_new_tokens", "48",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1", "--vllm.gpu_memory_utilization", "0.5",
        # CPU: no CUDA graphs, gloo weight sync, plain attention (flash-attention 2 has no CPU kernel).
        "--vllm.enforce_eager", "--vllm.sync_backend", "gloo", "--ds.attn_implementation", "sdpa",
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        # DAPO: group-normalised advantages, dynamic filtering, clip-higher, token-mean, no KL.
        "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
        "--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0", "1",
        "--actor.eps_clip_low_high", "0.2", "0.28", "--actor.loss_agg_mode", "token-mean",
        "--actor.entropy_coef", "0",  # entropy logged, not trained on
        "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "8", "--rollout.micro_batch_size", "16",
        "--train.batch_size", "64", "--train.micro_batch_size", "16", "--rollout.temperature", "1.0",
        "--train.num_episodes", str(episodes), "--train.seed", str(seed),
        "--actor.adam.lr", "1e-4", "--actor.lr_scheduler", "constant",
        "--ckpt.path", os.path.join(folder, "ckpt"), "--ckpt.output_dir", os.path.join(folder, "model"),
        "--logger.tensorboard_dir", os.path.join(folder, "tensorboard"), "--logger.wandb.run_name", "ablation",
    ] + ([] if alpha is None else ["--meds", "--algo.meds.num_layers", "4", "--algo.meds.alpha", str(alpha)])  # fmt: skip


def series(tensorboard_dir, eval_steps):
    """{tag: {step: value}}, the wall-clock seconds between consecutive training steps without an evaluation, and
    {step: wall-clock time} of each step's log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values, walls = {}, {}
    for folder, _, files in os.walk(tensorboard_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            events = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()
            for tag in events.Tags()["scalars"]:
                for event in events.Scalars(tag):
                    values.setdefault(tag, {})[event.step] = event.value
                    if tag == "train/reward":
                        walls[event.step] = event.wall_time
    steps = sorted(walls)
    pairs = [(a, b) for a, b in zip(steps, steps[1:]) if b == a + 1 and a % eval_steps and b % eval_steps]
    return values, [walls[b] - walls[a] for a, b in pairs], walls


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
    model = carry_model()
    pairs = carry_questions()
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
                    argv = run_args(model, folder, seed, alpha, args.episodes, args.eval_steps)
                    os.makedirs(folder, exist_ok=True)
                    if submit(cluster, argv, os.path.join(folder, "job.log"), on_line=lambda line: None) != 0:
                        raise SystemExit(f"the {arm} run of seed {seed} failed: see {folder}/job.log")
                    values, step_seconds, _ = series(os.path.join(folder, "tensorboard"), args.eval_steps)
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
