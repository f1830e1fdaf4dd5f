"""A control that collapses: MEDS against DAPO on two families of sums where one rewarded step is wrong for the other.

PROTOCOL (fixed before the full run, after the pilots in bench/results/collapse_pilots.md)

Task       Two-digit sums a + b whose tens do not overflow (tens digits 1..8 summing to <= 8), in two families:
           "carry" (units sum >= 10, 1260 questions) and "nocarry" (units sum <= 9, 1008 questions). A response
           reasons in two steps and boxes the sum: " 7 + 8 = 15, carry 1. 4 + 3 + 1 = 8. So the answer is
           \\boxed{85}." and " 3 + 4 = 7. 2 + 5 = 7. So the answer is \\boxed{77}."
Model      The project's tiny Qwen2 (4 blocks, hidden 64), fine-tuned by our code on every question of both families,
           8 solutions each, drawn per family from SFT_MIX: the carry family partly drops its carry, the nocarry
           family partly adds a spurious one ("3 + 4 = 7, carry 1. 2 + 5 + 1 = 8", boxed a + b + 10).
Data       Training: TRAIN_SIZES questions per family (the carry family the majority), revisited every episode;
           held out: HELDOUT_SIZES other questions per family, each labelled with its family (upstream's
           `datasource`, so its evaluation logs pass@1 and pass@n per family).
Arms       All DAPO (group-normalised advantages, dynamic filtering of all-right/all-wrong groups, clip-higher
           0.2/0.28, token-mean loss, no KL), 8 prompts x 8 rollouts a step, temperature 1, Adam lr 1e-3 constant
           (pilot 1: 3e-4 did not collapse the control; pilots 2-3: 1e-3 did, in both seeds), 3 episodes of the
           64 training questions (9-17 steps: dynamic filtering replaces dropped questions), the arm's flags on
           top (ARMS; the full run: FULL_RUN, 6 arms x 3 seeds; the other arms are the pilots'):
           control `--meds --algo.meds.alpha 0` (penalty 0, the same diagnostics); MEDS's layer-logit features at
           alpha 0.05, 0.1, 0.2; MEDS with the answer-identity memory (`--algo.meds.feature answer`, alpha 0.1);
           the positive control POSITIVE = GRPO's KL loss to the reference model (k3, coefficient 0.1), with MEDS
           at alpha 0 for the same diagnostics: in pilot 3 (seed 1) it ended at pass@16 0.469 where the control
           fell to 0.344; entropy bonuses of 0.01 (pilots 1-2) and 0.05 (pilot 3, 0.312) did not beat the control.
Seeds      0, 1, 2, the same `--train.seed` in every arm (it also seeds vLLM: engine seed = train seed + index).
           NOT paired: two alpha-0 arms with the same seed had different step-1 rollouts (pilots 1-2). Upstream
           sends every sample to vLLM's AsyncLLMEngine as a request of its own, without a per-request seed, so the
           random draws a sample gets depend on which requests share an engine step, i.e. on timing. Arms are
           therefore compared as samples of seeds, not seed by seed.
Metrics    Held out, n = N_EVAL samples a question at temperature 1: before training (step 0, sampled here with
           vLLM offline from the fine-tuned model, the trainer's sampling settings), every EVAL_STEPS steps
           (the trainer's own evaluation) and after the last step (vLLM offline from the saved model): unbiased
           pass@1..pass@n overall and per family; per family, the dominant-wrong share (per question, the share
           of its n samples giving its most frequent wrong answer, averaged over the family's questions) and the
           share of samples that are the spurious carry (a + b + 10). Per step: train/reward,
           train/meds/penalty_mean, train/meds/wrong_answers_distinct_per_question, policy entropy
           (train/entropy_loss), train/meds/cluster_answer_rank_correlation and train/meds/noise_vote_share.
Outcome    The primary outcome is held-out pass@n (n = 16, overall) after the last step, one value per run.
           `beats(a, b)`: arm a's mean over seeds exceeds arm b's by at least MIN_EFFECT (0.05) and by at least
           twice the standard error of the difference (sample variances over the seeds).
Gates      G1 "the control collapsed": the control's pass@n falls from step 0 to the end by >= 0.10, mean over
           seeds, or the minority's spurious-carry share rises by >= 0.10 (the designed mechanism; at lr 1e-3 the
           pilots collapsed by broad degradation instead). A family's dominant-wrong share > 0.5 is reported, not
           gated: the minority starts at 0.48-0.54.
           G2 "the positive control beat it": beats(POSITIVE, control).
           G3 "the clusters tracked answers": over the runs of the layer-logit arms, the mean of each run's mean
           cluster_answer_rank_correlation is >= 0.3 and the mean of its noise_vote_share <= 0.5.
Verdict    Per MEDS arm, only where G1 and G2 pass (and G3, for a layer-logit arm): "helps" if beats(arm,
           control), "hurts" if beats(control, arm), otherwise "no effect detected"; else "no verdict". Secondary
           metrics (pass@1, per family, the shares, entropy, penalties) are reported and not decided on.
Extension  Decided after the full run (G2 failed: +0.052 against twice its standard error, 0.235), so
           exploratory and reported beside the verdict above, never instead of it: seeds 3-6 of control, kl-0.1,
           meds-0.1 (the default alpha) and meds-answer-0.1 (the arm G3 does not gate), then the same gates and
           verdicts over seeds 0-6 (`--report` of both results files).

    python bench/collapse_experiment.py --pilot control --seed 0   # one run, its numbers printed and saved
    python bench/collapse_experiment.py                            # every arm x seed (the full run)
    python bench/collapse_experiment.py --quick                    # the pipeline, in a couple of minutes

Results: bench/results/collapse_experiment[_pilot-ARM-SEED|_quick].json.
"""

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from dapo_runs import dapo_args, logged, questions, sums_model, train_ppo_ray

from meds_patch.core.metrics import pass_at_k
from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SFT_MIX = {
    "carry": (("right", 0.50), ("dropped_carry", 0.35), ("units_slip", 0.15)),
    "nocarry": (("right", 0.50), ("spurious_carry", 0.50)),
}
TRAIN_SIZES = {"carry": 48, "nocarry": 16}
HELDOUT_SIZES = {"carry": 16, "nocarry": 16}
N_EVAL, EVAL_STEPS, MAX_NEW_TOKENS = 16, 2, 48  # an evaluation takes about 4 s (pilot 3)
ARMS = {  # arm: MEDS's alpha (0: no penalty, the same diagnostics) and the arm's further flags
    "control": (0, []),
    "meds-0.05": (0.05, []),
    "meds-0.1": (0.1, []),
    "meds-0.2": (0.2, []),
    "meds-answer-0.1": (0.1, ["--algo.meds.feature", "answer"]),
    "entropy": (0, ["--actor.entropy_coef", "0.01"]),
    "entropy-0.05": (0, ["--actor.entropy_coef", "0.05"]),
    # GRPO's KL loss to the reference (k3), which needs the reference model: a third (CPU) "GPU" in the cluster.
    "kl-0.1": (0, ["--algo.kl.init_coef", "0.1", "--algo.kl.use_loss", "--algo.kl.estimator", "k3",
                   "--ref.num_gpus_per_node", "1"]),
}  # fmt: skip
TRAIN_TAGS = (
    "train/reward", "train/meds/penalty_mean", "train/meds/wrong_answers_distinct_per_question",
    "train/entropy_loss", "train/meds/cluster_answer_rank_correlation", "train/meds/noise_vote_share",
    "train/response_length",
)  # fmt: skip


def split():
    """Per family, seeded: the training questions and the disjoint held-out ones, as (a, b, family)."""
    train, heldout = [], []
    for family in SFT_MIX:
        pairs = questions(family)
        random.Random(0).shuffle(pairs)
        train += [(a, b, family) for a, b in pairs[: TRAIN_SIZES[family]]]
        heldout += [(a, b, family) for a, b in pairs[TRAIN_SIZES[family] :][: HELDOUT_SIZES[family]]]
    random.Random(1).shuffle(train)  # families interleaved, so no batch is one family by construction
    return train, heldout


def write_jsonl(path, items):
    from meds_patch.cpu.tiny_math import PROMPT

    with open(path, "w") as fh:
        for a, b, family in items:
            fh.write(json.dumps({"prompt": PROMPT.format(a=a, b=b), "label": str(a + b), "datasource": family}) + "\n")
    return path


def sample_offline(model, heldout_path, out_path, seed):
    """Run in a process of its own (vLLM's engine and its OpenMP threads leave with it): n samples a held-out
    question with the trainer's sampling settings, their last boxed answers and grades, written to ``out_path``."""
    from vllm import LLM, SamplingParams

    from meds_patch.core.answers import last_boxed_answer
    from meds_patch.tools.math_reward import judge

    rows = [json.loads(line) for line in open(heldout_path)]
    llm = LLM(model=model, enforce_eager=True, dtype="bfloat16", seed=seed, gpu_memory_utilization=0.5)
    params = SamplingParams(n=N_EVAL, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=MAX_NEW_TOKENS, min_tokens=1,
                            skip_special_tokens=False)  # fmt: skip
    outputs = llm.generate([row["prompt"] for row in rows], params)
    result = []
    for row, output in zip(rows, outputs):
        answers = [last_boxed_answer(c.text) for c in output.outputs]
        correct, _ = judge(answers, [row["label"]] * len(answers))
        result.append({**row, "answers": answers, "correct": [bool(c) for c in correct]})
    with open(out_path, "w") as fh:
        json.dump(result, fh)


def offline_eval(model, heldout_path, out_path, seed):
    if os.path.exists(out_path):  # a --work folder reused: the samples are already there
        return score(json.load(open(out_path)))
    command = [sys.executable, os.path.abspath(__file__), "--sample", model, heldout_path, out_path, str(seed)]
    with open(out_path + ".log", "w") as log:
        subprocess.run(command, env={**os.environ, **CPU_ENV}, stdout=log, stderr=subprocess.STDOUT, check=True)
    return score(json.load(open(out_path)))


def score(rows):
    """Unbiased pass@k overall and per family, and per family the dominant-wrong and spurious-carry shares."""
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= N_EVAL]
    report = {}
    for family in [None, *SFT_MIX]:
        picked = [r for r in rows if family is None or r["datasource"] == family]
        entry = {f"pass@{k}": sum(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in picked) / len(picked)
                 for k in ks}  # fmt: skip
        if family:
            dominant, spurious = [], []
            for r in picked:
                wrong = collections.Counter(a for a, c in zip(r["answers"], r["correct"]) if not c)
                dominant.append(max(wrong.values(), default=0) / len(r["answers"]))
                spurious.append(sum(a == str(int(r["label"]) + 10) for a in r["answers"]) / len(r["answers"]))
            entry["dominant_wrong_share"] = sum(dominant) / len(dominant)
            entry["spurious_carry_share"] = sum(spurious) / len(spurious)
        report[family or "all"] = entry
    return report


def describe(arm, seed, run):
    """The pilot log's lines for one run: held-out values at step 0, each evaluation and the end; per-step train."""
    lines = [f"### {arm}, seed {seed}: {run['wall_seconds']:.0f} s, {len(run['train']['train/reward'])} steps", ""]
    ks = [k for k in run["step0"]["all"] if k.startswith("pass@")]
    lines += ["| held out | " + " | ".join(ks) + " | carry pass@n | nocarry pass@n | carry dom. wrong | "
              "nocarry dom. wrong | nocarry +10 share |", "|---" * (len(ks) + 6) + "|"]  # fmt: skip
    n = ks[-1]
    for label, r in (("step 0 (offline)", run["step0"]), ("end (offline)", run["final"])):
        cells = [r["all"][k] for k in ks] + [r["carry"][n], r["nocarry"][n], r["carry"]["dominant_wrong_share"]]
        cells += [r["nocarry"]["dominant_wrong_share"], r["nocarry"]["spurious_carry_share"]]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    evals = run["eval"]
    for step in sorted(evals.get("eval/eval_unbiased_pass@1", {})):
        cells = [f"{evals.get(f'eval/eval_unbiased_{k}', {}).get(step, float('nan')):.3f}" for k in ks]
        fam = [evals.get(f"eval/eval_{f}_pass{N_EVAL}", {}).get(step, float("nan")) for f in SFT_MIX]
        lines.append(f"| step {step} (trainer) | " + " | ".join(cells) + f" | {fam[0]:.3f} | {fam[1]:.3f} | | | |")
    lines += [
        "",
        "| step | " + " | ".join(t.split("/")[-1] for t in TRAIN_TAGS) + " |",
        "|---" * (len(TRAIN_TAGS) + 1) + "|",
    ]
    for step in sorted(run["train"]["train/reward"]):
        cells = [run["train"].get(t, {}).get(step) for t in TRAIN_TAGS]
        lines.append(f"| {step} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


MIN_EFFECT = 0.05  # in final held-out pass@n: about 1.6 of the 32 held-out questions
POSITIVE = "kl-0.1"  # the positive control (pilot 3)
FULL_RUN = ("control", "meds-0.05", "meds-0.1", "meds-0.2", "meds-answer-0.1", POSITIVE)
LAYER_ARMS = ("meds-0.05", "meds-0.1", "meds-0.2")


def beats(a, b):
    """The protocol's comparison of two arms' per-seed values (unpaired): the difference of their means is at
    least MIN_EFFECT and at least twice its standard error (sample variances, one seed one sample)."""
    standard_error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return statistics.mean(a) - statistics.mean(b) >= max(MIN_EFFECT, 2 * standard_error)


def summarise(result, out_png):
    """The report: per arm the final values (mean [min, max] over seeds), the three gates, the verdicts, the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, runs = result["seeds"], result["runs"]
    arms = [a for a in result["arms"] if all(f"{a}-{s}" in runs for s in seeds)]
    n = f"pass@{N_EVAL}"

    def per_seed(arm, value):
        return [value(runs[f"{arm}-{s}"]) for s in seeds]

    def tail_mean(run, tag, last=3):  # a per-step train metric, averaged over the run's last steps that logged it
        points = run["train"].get(tag, {})
        values = [points[k] for k in sorted(points, key=int)[-last:]]
        return sum(values) / len(values) if values else float("nan")

    columns = {
        f"final {n}": lambda r: r["final"]["all"][n],
        f"{n} drop from step 0": lambda r: r["step0"]["all"][n] - r["final"]["all"][n],
        "final pass@1": lambda r: r["final"]["all"]["pass@1"],
        f"carry {n}": lambda r: r["final"]["carry"][n],
        f"nocarry {n}": lambda r: r["final"]["nocarry"][n],
        "nocarry dom. wrong": lambda r: r["final"]["nocarry"]["dominant_wrong_share"],
        "nocarry +10 share": lambda r: r["final"]["nocarry"]["spurious_carry_share"],
        "nocarry +10 share rise from step 0": lambda r: r["final"]["nocarry"]["spurious_carry_share"]
        - r["step0"]["nocarry"]["spurious_carry_share"],
        "entropy (last 3 steps)": lambda r: tail_mean(r, "train/entropy_loss"),
        "penalty (last 3)": lambda r: tail_mean(r, "train/meds/penalty_mean"),
        "cluster-answer corr. (mean)": lambda r: tail_mean(r, "train/meds/cluster_answer_rank_correlation", 99),
        "noise vote share (mean)": lambda r: tail_mean(r, "train/meds/noise_vote_share", 99),
        "steps": lambda r: len(r["train"]["train/reward"]),
    }
    lines = [f"Mean [min, max] over seeds {', '.join(map(str, seeds))}; held-out values from the offline evaluation "
             "after the last step.", "", "| metric | " + " | ".join(arms) + " |",
             "|---" * (len(arms) + 1) + "|"]  # fmt: skip
    for label, value in columns.items():
        cells = []
        for arm in arms:
            v = [x for x in per_seed(arm, value) if x == x]
            cells.append(f"{sum(v) / len(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if v else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    final = {arm: per_seed(arm, columns[f"final {n}"]) for arm in arms}  # the primary outcome
    gates = {}
    if "control" in arms:
        drops = per_seed("control", columns[f"{n} drop from step 0"])
        rises = per_seed("control", columns["nocarry +10 share rise from step 0"])
        gates["control collapsed"] = sum(drops) / len(drops) >= 0.10 or sum(rises) / len(rises) >= 0.10
    if "control" in arms and POSITIVE in arms and len(seeds) > 1:
        gates["positive control beat it"] = beats(final[POSITIVE], final["control"])
    layer = [x for arm in LAYER_ARMS if arm in arms for x in per_seed(arm, columns["cluster-answer corr. (mean)"])]
    noise = [x for arm in LAYER_ARMS if arm in arms for x in per_seed(arm, columns["noise vote share (mean)"])]
    layer, noise = [x for x in layer if x == x], [x for x in noise if x == x]
    if layer and noise:
        gates["clusters tracked answers"] = sum(layer) / len(layer) >= 0.3 and sum(noise) / len(noise) <= 0.5
    lines += ["", "Gates: " + ("; ".join(f"{g}: {'PASS' if ok else 'FAIL'}" for g, ok in gates.items()) or "none run")]
    verdicts = {}
    for arm in arms:
        if not arm.startswith("meds") or "control" not in arms or len(seeds) < 2:
            continue
        needed = ["control collapsed", "positive control beat it"] + (["clusters tracked answers"]
                                                                       if arm in LAYER_ARMS else [])  # fmt: skip
        failed = [g for g in needed if not gates.get(g)]
        if failed:
            verdicts[arm] = "no verdict (gate not passed: " + ", ".join(failed) + ")"
        elif beats(final[arm], final["control"]):
            verdicts[arm] = "helps"
        elif beats(final["control"], final[arm]):
            verdicts[arm] = "hurts"
        else:
            verdicts[arm] = "no effect detected"
    lines += ["", "Verdicts: " + ("; ".join(f"{a}: {v}" for a, v in verdicts.items()) or "none")]

    curves = {
        f"held-out {n} (square: end)": ("eval", f"eval/eval_unbiased_{n}", n),
        f"held-out nocarry {n}": ("eval", f"eval/eval_nocarry_pass{N_EVAL}", "nocarry"),
        "train reward": ("train", "train/reward", None),
        "policy entropy": ("train", "train/entropy_loss", None),
        "mean penalty": ("train", "train/meds/penalty_mean", None),
        "cluster-answer rank correlation": ("train", "train/meds/cluster_answer_rank_correlation", None),
    }
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    colors = dict(zip(dict.fromkeys(FULL_RUN + tuple(ARMS)), plt.cm.tab10.colors + plt.cm.Dark2.colors))
    for ax, (label, (kind, tag, k)) in zip(axes.flat, curves.items()):
        for arm in arms:
            tables, ends, lengths = [], [], []
            for s in seeds:
                run = runs[f"{arm}-{s}"]
                tables.append({int(step): v for step, v in run[kind].get(tag, {}).items()})
                if k:  # evaluations: the offline ones before the first step and after the last one
                    family, key = ("all", k) if k.startswith("pass@") else (k, n)
                    tables[-1][0] = run["step0"][family][key]
                    ends.append(run["final"][family][key])
                    lengths.append(len(run["train"]["train/reward"]))
            common = sorted(set.intersection(*(set(t) for t in tables)))  # the steps every seed reached
            if not common:
                continue
            mean = [sum(t[i] for t in tables) / len(tables) for i in common]
            ax.plot(common, mean, marker="o" if k else None, color=colors[arm], label=arm)
            ax.fill_between(common, [min(t[i] for t in tables) for i in common],
                            [max(t[i] for t in tables) for i in common], color=colors[arm], alpha=0.15)  # fmt: skip
            if ends:  # runs end after different numbers of steps: the end at their mean length, bar min-max
                x, y = sum(lengths) / len(lengths), sum(ends) / len(ends)
                ax.plot([common[-1], x], [mean[-1], y], linestyle="--", color=colors[arm])
                ax.errorbar([x], [y], yerr=[[y - min(ends)], [max(ends) - y]], fmt="s", color=colors[arm], capsize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"DAPO on two families of sums, lr {result['lr']}: mean over seeds {seeds}, band min-max")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return "\n".join(lines), gates, verdicts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pilot", choices=list(ARMS), nargs="+", help="only these arms (with --seed)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)  # 3e-4 did not collapse the control (pilot 1)
    parser.add_argument("--quick", action="store_true", help="control only, 1 seed, 1 episode: a smoke test")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--results", default=RESULTS, help="where the JSON goes (default: bench/results)")
    parser.add_argument("--tag", default=None, help="suffix of the results file (default from the mode)")
    parser.add_argument("--report", metavar="JSON", nargs="+",
                        help="only summarise results files (their common arms, all their seeds) and draw the plot")  # fmt: skip
    parser.add_argument("--sample", nargs=4, metavar=("MODEL", "HELDOUT", "OUT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample:
        return sample_offline(*args.sample[:3], int(args.sample[3]))
    if args.report:
        results = [json.load(open(path)) for path in args.report]
        if any(len({repr(r.get(key)) for r in results}) > 1 for key in ("lr", "episodes", "model")):
            raise SystemExit("--report: the files differ in lr, episodes or model; their runs are not one experiment")
        if len({k for r in results for k in r["runs"]}) < sum(len(r["runs"]) for r in results):
            raise SystemExit("--report: the files hold the same arm and seed twice; give each run once")
        result = {**results[0], "runs": {k: v for r in results for k, v in r["runs"].items()},
                  "arms": [a for a in results[0]["arms"] if all(a in r["arms"] for r in results)],
                  "seeds": sorted({s for r in results for s in r["seeds"]})}  # fmt: skip
        name = (
            args.report[0]
            if len(args.report) == 1
            else os.path.join(args.results, f"collapse_experiment{args.tag or '_combined'}.json")
        )
        print(summarise(result, name[: -len(".json")] + ".png")[0])
        return
    arms = args.pilot or list(FULL_RUN)
    if args.quick:
        arms, args.seed, args.episodes = ["control"], [0], 1
    suffix = args.tag or ("_quick" if args.quick else f"_pilot-{'-'.join(arms)}-{'-'.join(map(str, args.seed))}"
                          if args.pilot else "")  # fmt: skip
    start = time.time()
    print("preparing the fine-tuned model (cached after the first time) ...", flush=True)
    model = sums_model("twofamily-qwen2", SFT_MIX)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="meds-collapse-"))
    os.makedirs(work, exist_ok=True)
    train, heldout = split()
    write_jsonl(os.path.join(work, "train.jsonl"), train)
    heldout_path = write_jsonl(os.path.join(work, "heldout.jsonl"), heldout)
    runs, step0 = {}, {}
    try:
        for seed in args.seed:
            # The step-0 evaluation depends only on the model, the held-out set and the seed: once per seed.
            print(f"[{time.time() - start:.0f} s] step-0 evaluation, seed {seed} ...", flush=True)
            step0[seed] = offline_eval(model, heldout_path, os.path.join(work, f"step0-{seed}.json"), seed)
            print(json.dumps(step0[seed]), flush=True)
        with LocalRayCluster(env=CPU_ENV, num_gpus=3) as cluster:
            for seed in args.seed:
                for arm in arms:
                    folder = os.path.join(work, f"{arm}-{seed}")
                    wall_file = os.path.join(folder, "wall_seconds")
                    print(f"[{time.time() - start:.0f} s] {arm}, seed {seed} ...", flush=True)
                    alpha, flags = ARMS[arm]
                    argv = dapo_args(model, folder, seed=seed, episodes=args.episodes, run_name="collapse",
                                     alpha=alpha, lr=args.lr, max_new_tokens=MAX_NEW_TOKENS, eval_steps=EVAL_STEPS,
                                     eval_samples=N_EVAL) + flags  # fmt: skip
                    if os.path.exists(wall_file):  # a --work folder reused: ran already
                        wall, values = float(open(wall_file).read()), logged(folder)
                    else:
                        began = time.time()
                        values = train_ppo_ray(cluster, argv, folder)
                        wall = time.time() - began
                        with open(wall_file, "w") as fh:
                            fh.write(str(wall))
                    runs[(arm, seed)] = {
                        "wall_seconds": wall,
                        "train": {t: values[t] for t in TRAIN_TAGS if t in values},
                        "eval": {t: v for t, v in values.items() if t.startswith("eval/")},
                        "step0": step0[seed],
                    }
        for (arm, seed), run in runs.items():
            final = os.path.join(work, f"{arm}-{seed}", "final.json")
            run["final"] = offline_eval(os.path.join(work, f"{arm}-{seed}", "model"), heldout_path, final, seed)
            print(describe(arm, seed, run), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.results, exist_ok=True)
    out_json = os.path.join(args.results, f"collapse_experiment{suffix}.json")
    result = {"arms": arms, "seeds": args.seed, "episodes": args.episodes, "lr": args.lr, "sft_mix": SFT_MIX,
              "model": os.path.basename(model),
              "train_sizes": TRAIN_SIZES, "heldout_sizes": HELDOUT_SIZES,
              "runs": {f"{a}-{s}": r for (a, s), r in runs.items()}}  # fmt: skip
    # Through JSON first, so the report of a finished run and of a reloaded one read the same keys.
    result = json.loads(json.dumps(result))
    report, result["gates"], result["verdicts"] = summarise(result, out_json[: -len(".json")] + ".png")
    result["report"] = report
    print(report, flush=True)
    with open(out_json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"done in {time.time() - start:.0f} s; {out_json}")


if __name__ == "__main__":
    main()
