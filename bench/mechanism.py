"""When does MEDS change learning? A controlled simulation of the mechanism, with the error modes known.

Each question has a policy over answers, softmax(logits): answer 0 is correct, answers 1..M are wrong modes, and
the start is a collapse: wrong mode 1 holds DOMINANT of the wrong mass. Every step samples n rollouts per question
(reward 1 if correct, else 0), shapes the rewards with the project's real memory and penalty (``ErrorMemory`` on
features or ``AnswerMemory`` on answers, then ``apply_penalties``, in ``glue.shape_rewards``' order), normalises
them per group as the recipes' estimators do, and takes one policy-gradient step on the logits. A rollout's feature
is its mode's embedding plus Gaussian noise; the noise sets how well HDBSCAN's clusters can track the modes, which
the project's diagnostic (``cluster_answer_agreement``) measures as it does in a real run. A network, shared
parameters, tokens and PPO's clipping (inactive anyway: one on-policy step per batch) are left out on purpose.

SET-UP (fixed after pilots; the pilots also ran MEDS arms, so the set-up is not blind to them)
Task       4 questions, p(correct) at the start 0.01 / 0.03 / 0.1 / 0.3; 4 wrong modes, the first holding 80 % of
           the wrong mass; n = 8 rollouts a question a step, 40 steps, learning rate 0.3 on the logits. The first
           set-up tried (start 0.02-0.2, learning rate 1) saturated grpo and dapo near pass@1 0.98; this, the
           second, leaves the control between stalled and saturated.
Estimators grpo = OpenRLHF's group_norm ((r - mean) / (sample std + 1e-9)); dr_grpo (r - mean); dapo = group_norm
           with DAPO's dynamic filter (all-right and all-wrong groups dropped before MEDS sees them). Each group
           trains its own question: the loss is the group's mean of A log pi(a).
Arms       none; meds-A (ErrorMemory on features, alpha A in ALPHAS, feature noise 0.3); answer-A (AnswerMemory);
           flat-A (every wrong rollout loses 2A, the cap of MEDS's penalty: MEDS without a memory); meds-0.1 at the
           feature noises NOISES; entropy-C (an entropy bonus) and kl-C (a KL penalty to the start policy), with
           exact gradients, at the coefficients ENTROPY and KL (a pilot on seeds 1000-1029 swept 0.01-0.3 and
           0.01-0.2); kl-C+meds-0.1 and kl-C+answer-0.1; and questions with one wrong mode (every wrong rollout in
           one cluster) for none, meds-0.1 and flat-0.1. Beyond meds-0.1, the feature memory runs under grpo and
           dr_grpo only (main says why).
Seeds      0-49 in every arm. Sampling draws the same uniforms in every arm (common random numbers), so arms part
           only where their updates differ and differences are paired by seed: mean +- 2 standard errors.
Outcomes   pass@1 and pass@16, exact from the policy (1 - (1 - p)^k, averaged over the questions); the dominant
           wrong mode's share of the wrong mass; the steps until the mean p(correct) reaches 0.5 (41: not within
           40); per step, the diagnostic's rank correlation and noise-vote share, the penalty's share cancelled by
           centring and by the std, how far it moved the advantages, and the share of penalties at the cap.

    python bench/mechanism.py            # the study behind BENCHMARKS.md §8
    python bench/mechanism.py --quick    # 3 seeds, 6 steps, a few arms: the pipeline, in the test suite

Results: bench/results/mechanism[_quick].json (per-seed outcomes, mean curves) and mechanism[_quick].png.
"""

import os

# Worker processes share the cores; BLAS threads inside each only contend: 4 threads each made a run 1.5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402

from meds_patch.core.config import MEDSConfig  # noqa: E402
from meds_patch.core.memory import AnswerMemory, ErrorMemory  # noqa: E402
from meds_patch.core.metrics import cluster_answer_agreement  # noqa: E402
from meds_patch.core.penalty import apply_penalties  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

START_CORRECT = (0.01, 0.03, 0.1, 0.3)  # p(correct answer) at the start, one entry per question
WRONG_MODES = 4
DOMINANT = 0.8  # share of the wrong probability mass on wrong mode 1 at the start
ROLLOUTS = 8
STEPS = 40
LR = 0.3
FEATURE_DIM = 14  # the default num_layers
BASE_NOISE = 0.3
PASS_K = 16
LEVEL = 0.5
SEEDS = 50
ALPHAS = (0.03, 0.1, 0.3, 1.0)
NOISES = (0.6, 1.0, 1.5, 2.0)
ENTROPY = (0.03, 0.1, 0.3)
KL = (0.05, 0.2)

# (std-normalised, dynamic filter): OpenRLHF's group_norm (GRPO), dr_grpo, and group_norm with DAPO's filter.
ESTIMATORS = {"grpo": (True, False), "dr_grpo": (False, False), "dapo": (True, True)}
STEP_METRICS = (
    "rank_correlation",  # cluster_answer_agreement, as train/meds/* in a real run
    "noise_vote_share",
    # Groups with both outcomes: shares of the penalty (squared norm) along the group mean, which centring removes,
    # and along the outcome contrast, a rescale that the std undoes; and the advantages' RMS change, relative.
    "mixed_cancelled_by_centring",
    "mixed_cancelled_by_std",
    "mixed_advantage_shift",
    # Groups with no correct rollout: the share along the group mean, and the advantages' RMS change (from 0).
    "all_wrong_cancelled_by_centring",
    "all_wrong_advantage_shift",
    "mean_penalty",  # over the wrong rollouts that reached the memory
    "at_cap",  # share of those whose penalty is the cap beta
    "all_wrong_groups",
    "dropped_groups",
)


@dataclass(frozen=True)
class Arm:
    name: str
    memory: str = "none"  # none, features (ErrorMemory: the paper's), answer (AnswerMemory), flat (p = beta)
    alpha: float = 0.0
    noise: float = BASE_NOISE  # norm of a feature's noise; a mode's embedding has norm 1
    entropy: float = 0.0
    kl: float = 0.0
    wrong_modes: int = WRONG_MODES


def run(arm: Arm, estimator: str, seed: int, steps: int) -> dict:
    """One training run: p(correct) and p(dominant wrong | wrong) per step and question, and the STEP_METRICS."""
    std_normalised, dynamic_filter = ESTIMATORS[estimator]
    # Separate streams: the answers' uniforms are the same in every arm of a seed (common random numbers), so arms
    # part only where their updates differ; the feature noise and the embeddings come from streams of their own.
    sampling, feature_noise, geometry = (np.random.default_rng([seed, stream]) for stream in range(3))
    questions, choices = len(START_CORRECT), 1 + arm.wrong_modes
    start = np.empty((questions, choices))
    start[:, 0] = START_CORRECT
    wrong_mass = 1 - start[:, :1]
    start[:, 1:2] = wrong_mass * (DOMINANT if arm.wrong_modes > 1 else 1.0)
    start[:, 2:] = wrong_mass * (1 - DOMINANT) / max(arm.wrong_modes - 1, 1)
    log_start = np.log(start)
    logits = log_start.copy()
    embedding = geometry.standard_normal((questions, choices, FEATURE_DIM))
    embedding /= np.linalg.norm(embedding, axis=-1, keepdims=True)

    config = MEDSConfig(alpha=arm.alpha, feature="answer" if arm.memory == "answer" else "layer_logits")
    memory = (
        ErrorMemory(config) if arm.memory == "features" else AnswerMemory(config) if arm.memory == "answer" else None
    )
    same_answer = AnswerMemory(replace(config, target="wrong"))  # the glue's diagnostic memory
    question_of = np.repeat(np.arange(questions), ROLLOUTS)
    keys = np.array([f"question-{q}" for q in question_of])

    p_correct, p_dominant = np.zeros((steps + 1, questions)), np.zeros((steps + 1, questions))
    per_step = {name: np.full(steps, np.nan) for name in STEP_METRICS}
    for step in range(steps + 1):
        policy = np.exp(logits - logits.max(1, keepdims=True))
        policy /= policy.sum(1, keepdims=True)
        p_correct[step], p_dominant[step] = policy[:, 0], policy[:, 1] / policy[:, 1:].sum(1)
        if step == steps:
            break

        # Sample by inverse CDF from uniforms that do not depend on the policy (the common random numbers).
        uniforms = sampling.random((questions, ROLLOUTS))
        answers = (uniforms[..., None] > np.cumsum(policy, 1)[:, None, :-1]).sum(-1).reshape(-1)
        correct = answers == 0
        rewards = correct.astype(np.float64)
        features = embedding[question_of, answers]
        features += arm.noise / math.sqrt(FEATURE_DIM) * feature_noise.standard_normal(features.shape)

        # DAPO's filter drops all-right and all-wrong groups before MEDS sees them (docs/ALGORITHM.md §2).
        group_mean = rewards.reshape(questions, ROLLOUTS).mean(1)
        kept_groups = (group_mean > 0) & (group_mean < 1) if dynamic_filter else np.ones(questions, bool)
        kept = np.repeat(kept_groups, ROLLOUTS)
        penalties = np.zeros(len(answers))
        if memory is not None and kept.any():  # glue.shape_rewards' order: memory update, penalties, diagnostic
            answer_text = [str(a) for a in answers[kept]]
            penalties[kept] = memory.update(
                list(keys[kept]), correct[kept], answer_text if arm.memory == "answer" else features[kept]
            )
            same_answer.update(list(keys[kept]), correct[kept], answer_text)
            agreement = cluster_answer_agreement(correct[kept], memory.last_votes, same_answer.last_votes.sizes)
            per_step["rank_correlation"][step] = agreement.get("cluster_answer_rank_correlation", np.nan)
            per_step["noise_vote_share"][step] = agreement.get("noise_vote_share", np.nan)
        elif arm.memory == "flat":
            penalties[kept & ~correct] = config.penalty_cap
        shaped = apply_penalties(rewards, correct, penalties)

        # Group normalisation as OpenRLHF's group_norm (sample std + 1e-9) and dr_grpo (mean only); the advantages
        # without the penalty too, to measure what the penalty changed.
        grouped, outcome = shaped.reshape(questions, ROLLOUTS), rewards.reshape(questions, ROLLOUTS)
        advantages = grouped - grouped.mean(1, keepdims=True)
        plain = outcome - outcome.mean(1, keepdims=True)
        if std_normalised:
            advantages /= grouped.std(1, ddof=1, keepdims=True) + 1e-9
            plain /= outcome.std(1, ddof=1, keepdims=True) + 1e-9
        advantages[~kept_groups] = 0.0

        # Where normalisation leaves the penalty: its part along the group mean is removed by centring; with a
        # std, its part along the outcome contrast only rescales the advantages, which the std undoes. The RMS
        # change of the advantages is what reached the update (a std can also amplify what is left).
        penalty = penalties.reshape(questions, ROLLOUTS)
        energy = (penalty**2).sum(1)
        penalised = kept_groups & (energy > 0)
        if penalised.any():
            contrast = outcome - group_mean[:, None]
            centred = penalty - penalty.mean(1, keepdims=True)
            energy = np.maximum(energy, 1e-300)  # the groups read below all have energy > 0
            along_mean = ROLLOUTS * penalty.mean(1) ** 2 / energy
            along_contrast = (centred * contrast).sum(1) ** 2 / np.maximum((contrast**2).sum(1), 1e-12) / energy
            shift = np.sqrt(((advantages - plain) ** 2).mean(1))
            mixed, all_wrong = penalised & (group_mean > 0), penalised & (group_mean == 0)
            if mixed.any():
                per_step["mixed_cancelled_by_centring"][step] = along_mean[mixed].mean()
                per_step["mixed_cancelled_by_std"][step] = along_contrast[mixed].mean() if std_normalised else np.nan
                per_step["mixed_advantage_shift"][step] = (shift[mixed] / np.sqrt((plain[mixed] ** 2).mean(1))).mean()
            if all_wrong.any():
                per_step["all_wrong_cancelled_by_centring"][step] = along_mean[all_wrong].mean()
                per_step["all_wrong_advantage_shift"][step] = shift[all_wrong].mean()
            wrong_rows = ~correct & kept
            per_step["mean_penalty"][step] = penalties[wrong_rows].mean()
            per_step["at_cap"][step] = np.isclose(penalties[wrong_rows], config.penalty_cap).mean()
        per_step["all_wrong_groups"][step] = (group_mean == 0).mean()
        per_step["dropped_groups"][step] = (~kept_groups).mean()

        # The gradient of each group's mean of A_i log pi(a_i), plus the exact gradients of the regularisers, on
        # the groups that are trained (a group DAPO drops gets no loss at all).
        pushed = np.zeros_like(policy)
        np.add.at(pushed, (question_of, answers), advantages.reshape(-1))
        gradient = (pushed - advantages.sum(1, keepdims=True) * policy) / ROLLOUTS
        log_policy = np.log(policy)
        entropy = -(policy * log_policy).sum(1, keepdims=True)
        kl = (policy * (log_policy - log_start)).sum(1, keepdims=True)
        gradient -= arm.entropy * policy * (log_policy + entropy)
        gradient -= arm.kl * policy * (log_policy - log_start - kl)
        logits += LR * gradient * kept_groups[:, None]

    if arm.memory == "features":
        memory.wait_for_refit()  # its background fit must not outlive the run
    return {"p_correct": p_correct, "p_dominant": p_dominant, **per_step}


def run_seeds(job):
    arm, estimator, seeds, steps = job
    return arm.name, estimator, [run(arm, estimator, seed, steps) for seed in seeds]


def interval(values) -> tuple:
    """Mean and twice its standard error (over seeds)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(2 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def outcomes(runs) -> dict:
    """Per-seed outcomes of one arm: final pass@1, pass@k, dominant share, per-question p(correct), steps to
    LEVEL, and each step metric averaged over the run's steps."""
    p = np.array([r["p_correct"] for r in runs])  # seeds, steps + 1, questions
    mean_p = p.mean(2)
    reached = mean_p >= LEVEL
    per_seed = {
        "pass@1": p[:, -1].mean(1),
        f"pass@{PASS_K}": (1 - (1 - p[:, -1]) ** PASS_K).mean(1),
        "dominant_share": np.array([r["p_dominant"][-1].mean() for r in runs]),
        "steps_to_level": np.where(reached.any(1), reached.argmax(1), p.shape[1]),
    }
    per_seed.update({f"p_correct_q{q}": p[:, -1, q] for q in range(p.shape[2])})
    for name in STEP_METRICS:
        per_seed[name] = np.array([np.nanmean(r[name]) if np.isfinite(r[name]).any() else np.nan for r in runs])
    curves = {
        "pass@1": mean_p.mean(0),
        f"pass@{PASS_K}": (1 - (1 - p) ** PASS_K).mean(2).mean(0),
        "dominant_share": np.array([r["p_dominant"] for r in runs]).mean(2).mean(0),
        "p_correct_per_question": p.mean(0),
    }
    with warnings.catch_warnings():  # a step where no run had a value (e.g. step 0: nothing is sized) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in ("rank_correlation", "at_cap"):
            curves[name] = np.nanmean(np.array([r[name] for r in runs]), 0)
    return {"per_seed": per_seed, "curves": curves}


def effect(study, estimator, arm, metric, control="none"):
    """Mean and 2 s.e. of arm - control, paired by seed (NaN seeds left out); None if either did not run."""
    if arm not in study[estimator] or control not in study[estimator]:
        return None
    a = study[estimator][arm]["per_seed"][metric]
    b = study[estimator][control]["per_seed"][metric]
    ok = np.isfinite(a) & np.isfinite(b)
    return interval(a[ok] - b[ok])


def fmt(mean_and_error, digits=3) -> str:
    if mean_and_error is None:
        return "–"
    mean, error = mean_and_error
    return f"{mean:+.{digits}f} ± {error:.{digits}f}"


def report(study) -> str:
    """The section's tables, as markdown: differences to the control, mean ± 2 s.e. over the paired seeds."""
    k = f"pass@{PASS_K}"
    grpo = study["grpo"]
    alphas = [a for a in ALPHAS if f"meds-{a:g}" in grpo]
    kls = [c for c in KL if f"kl-{c:g}" in grpo]
    main_arms = (
        ["meds-0.1", "answer-0.1", "flat-0.1"] + [f"entropy-{c:g}" for c in ENTROPY] + [f"kl-{c:g}" for c in KL]
    )
    hardest = lambda seeds: (seeds["p_correct_q0"] + seeds["p_correct_q1"]) / 2  # noqa: E731

    def mean(estimator, arm, metric):
        values = study[estimator][arm]["per_seed"][metric] if arm in study[estimator] else np.array([np.nan])
        return f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "–"

    lines = [f"Outcomes after {len(grpo['none']['curves']['pass@1']) - 1} steps.\n"]
    for estimator, arms in study.items():
        control = arms["none"]["per_seed"]
        lines += [
            f"**{estimator}**: the control ends at pass@1 {control['pass@1'].mean():.3f}, {k} "
            f"{control[k].mean():.3f}, dominant share {control['dominant_share'].mean():.3f}, p(correct) of the "
            f"two hardest questions {hardest(control).mean():.3f}; its mean p(correct) reaches {LEVEL} within "
            f"{STEPS} steps in {(control['steps_to_level'] <= STEPS).sum()} of {len(control['pass@1'])} seeds "
            f"(a run that never does counts as {STEPS + 1}). Differences to it:\n",
            f"| arm | Δ pass@1 | Δ {k} | Δ p(correct), 2 hardest | Δ dominant share | Δ steps to {LEVEL} |",
            "|---|---|---|---|---|---|",
        ]
        for arm in (a for a in main_arms if a in arms):
            seeds = arms[arm]["per_seed"]
            lines.append(
                f"| {arm} | {fmt(effect(study, estimator, arm, 'pass@1'))} | {fmt(effect(study, estimator, arm, k))} "
                f"| {fmt(interval(hardest(seeds) - hardest(control)))} "
                f"| {fmt(effect(study, estimator, arm, 'dominant_share'))} "
                f"| {fmt(effect(study, estimator, arm, 'steps_to_level'), 1)} |"
            )
        lines.append("")

    lines += [
        "**Effect against α** (Δ pass@1 to the control; MEDS's mean penalty on wrong rollouts in brackets; the last "
        "column is what the memory adds to a flat penalty of the same cap, paired by seed):\n",
        "| estimator | α | meds (features) | answer memory | flat (p = 2α on every wrong rollout) | meds − flat |",
        "|---|---|---|---|---|---|",
    ]
    for estimator in study:
        for a in alphas:
            penalty = mean(estimator, f"meds-{a:g}", "mean_penalty")
            lines.append(
                f"| {estimator} | {a:g} | {fmt(effect(study, estimator, f'meds-{a:g}', 'pass@1'))} ({penalty}) "
                f"| {fmt(effect(study, estimator, f'answer-{a:g}', 'pass@1'))} "
                f"| {fmt(effect(study, estimator, f'flat-{a:g}', 'pass@1'))} "
                f"| {fmt(effect(study, estimator, f'meds-{a:g}', 'pass@1', control=f'flat-{a:g}'))} |"
            )

    noisy = [("meds-0.1", BASE_NOISE)] + [
        (f"meds-0.1-noise-{s:g}", s) for s in NOISES if f"meds-0.1-noise-{s:g}" in grpo
    ]
    lines += [
        "\n**Effect against cluster quality** (meds-0.1; ρ and the noise-vote share are the diagnostic's, mean over "
        "steps and seeds):\n",
        "| feature noise | ρ: "
        + " / ".join(study)
        + " | noise votes (grpo) | "
        + " | ".join(f"Δ pass@1, {e}" for e in study)
        + " | Δ dominant share, grpo |",
        "|---|---|---|" + "---|" * len(study) + "---|",
    ]
    for arm, noise in noisy:
        rho = " / ".join(mean(e, arm, "rank_correlation") for e in study)
        votes = mean("grpo", arm, "noise_vote_share")
        effects = " | ".join(fmt(effect(study, e, arm, "pass@1")) for e in study)
        lines.append(
            f"| {noise:g} | {rho} | {votes} | {effects} | {fmt(effect(study, 'grpo', arm, 'dominant_share'))} |"
        )

    per_question = ["meds-0.1", "answer-0.1", "entropy-0.3"]
    lines += [
        "\n**Per question** (final p(correct): the control's, and differences to it):\n",
        "| estimator | start | control | " + " | ".join(f"Δ {arm}" for arm in per_question) + " |",
        "|---|---|---|" + "---|" * len(per_question),
    ]
    for estimator in study:
        for q, p0 in enumerate(START_CORRECT):
            cells = [fmt(effect(study, estimator, arm, f"p_correct_q{q}")) for arm in per_question]
            control = study[estimator]["none"]["per_seed"][f"p_correct_q{q}"].mean()
            lines.append(f"| {estimator} | {p0:g} | {control:.3f} | " + " | ".join(cells) + " |")

    lines += [
        "\n**Where the penalty goes** (means over steps and seeds; shares of a group's penalty in squared norm; the "
        "advantage shift is the RMS change of a group's advantages, relative to their RMS in mixed groups):\n",
        "| estimator | arm | all-wrong groups | dropped | at the cap | mixed: cancelled by centring | by the std "
        "| mixed: advantage shift | all-wrong: cancelled by centring | all-wrong: advantage shift |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for estimator in study:
        for arm in ("meds-0.1", "meds-0.1-noise-2", "answer-0.1", "flat-0.1"):
            if arm in study[estimator]:
                columns = ("all_wrong_groups", "dropped_groups", "at_cap") + STEP_METRICS[2:7]
                lines.append(f"| {estimator} | {arm} | " + " | ".join(mean(estimator, arm, m) for m in columns) + " |")

    lines += [
        "\n**Where MEDS cannot act: one wrong mode** (every wrong rollout in one cluster; Δ pass@1 to the "
        "one-mode control, and the largest |Δ| of a seed):\n",
        "| estimator | meds-0.1 | largest | flat-0.1 | largest |",
        "|---|---|---|---|---|",
    ]
    for estimator in (e for e in study if "one-mode:none" in study[e]):
        cells = []
        for arm in ("one-mode:meds-0.1", "one-mode:flat-0.1"):
            d = study[estimator][arm]["per_seed"]["pass@1"] - study[estimator]["one-mode:none"]["per_seed"]["pass@1"]
            cells += [fmt(interval(d)), f"{np.abs(d).max():.2g}"]
        lines.append(f"| {estimator} | " + " | ".join(cells) + " |")

    lines += [
        "\n**The appendix's claim in the loop** (Δ pass@1 from adding MEDS at α 0.1 to a KL-to-start run):\n",
        "| estimator | " + " | ".join(f"kl-{c:g}: + meds | kl-{c:g}: + answer" for c in kls) + " |",
        "|---|" + "---|---|" * len(kls),
    ]
    for estimator in study:
        cells = [
            fmt(effect(study, estimator, f"kl-{c:g}+{memory}-0.1", "pass@1", control=f"kl-{c:g}"))
            for c in kls
            for memory in ("meds", "answer")
        ]
        lines.append(f"| {estimator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(study, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    shown = {
        "none": "0.6",
        "meds-0.1": "tab:red",
        "answer-0.1": "tab:orange",
        "flat-0.1": "tab:blue",
        "entropy-0.3": "tab:green",
        "kl-0.05": "tab:purple",
    }
    for ax, (estimator, arms) in zip(axes[0], study.items()):
        for arm, color in shown.items():
            if arm in arms:
                width = 4 if arm == "none" else 1.5  # wide and grey: an arm identical to the control lies on it
                ax.plot(arms[arm]["curves"]["pass@1"], color=color, lw=width, label=arm)
                ax.plot(arms[arm]["curves"]["p_correct_per_question"][:, 1], color=color, lw=width, ls=":")
        ax.set(xlabel="step", ylim=(0, 1))
        ax.set_title(f"{estimator}: pass@1 (solid), p(correct) of the 0.03 question (dotted)", fontsize=9)
        ax.legend(fontsize=7)

    ax = axes[1, 0]
    for estimator, marker in zip(study, "osD"):
        for family, color in (("meds", "tab:red"), ("answer", "tab:orange"), ("flat", "tab:blue")):
            xs = [a for a in ALPHAS if f"{family}-{a:g}" in study[estimator]]
            if xs:
                effects = np.array([effect(study, estimator, f"{family}-{a:g}", "pass@1") for a in xs])
                ax.errorbar(
                    xs,
                    effects[:, 0],
                    effects[:, 1],
                    color=color,
                    marker=marker,
                    capsize=2,
                    label=f"{family}, {estimator}",
                )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="α", ylabel="Δ final pass@1 (± 2 s.e.)", title="Effect against α")
    ax.legend(fontsize=6, ncol=2)

    ax = axes[1, 1]
    for estimator, marker in zip(study, "osD"):
        names = ["meds-0.1"] + [f"meds-0.1-noise-{s:g}" for s in NOISES if f"meds-0.1-noise-{s:g}" in study[estimator]]
        rho = [np.nanmean(study[estimator][n]["per_seed"]["rank_correlation"]) for n in names]
        effects = np.array([effect(study, estimator, n, "pass@1") for n in names])
        ax.errorbar(rho, effects[:, 0], effects[:, 1], marker=marker, capsize=2, label=estimator)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xlabel=f"measured cluster–answer ρ (feature noise {max(NOISES):g} … {BASE_NOISE:g})",
        ylabel="Δ final pass@1 (± 2 s.e.)",
        title="Effect against cluster quality, α = 0.1",
    )
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    for estimator, color in zip(study, ("tab:red", "tab:blue", "tab:green")):
        curves = study[estimator]["meds-0.1"]["curves"]
        ax.plot(curves["at_cap"], color=color, label=f"{estimator}: penalties at the cap")
        ax.plot(curves["rank_correlation"], color=color, ls="--", label=f"{estimator}: ρ")
    ax.set(xlabel="step", ylim=(-0.1, 1.05), title="meds-0.1: saturation and cluster–answer ρ per step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 6 steps, one arm of each kind")
    parser.add_argument("--results", default=RESULTS, help="folder for the JSON and the plot")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes running seeds")
    args = parser.parse_args()
    seeds, steps = (range(3), 6) if args.quick else (range(SEEDS), STEPS)
    alphas, noises = ((0.1,), (2.0,)) if args.quick else (ALPHAS, NOISES)
    entropies, kls = (ENTROPY[-1:], KL[:1]) if args.quick else (ENTROPY, KL)

    # Every (arm, estimators it runs with); the quick mode keeps one arm of each kind. HDBSCAN is the cost, so the
    # feature memory runs under dapo at alpha 0.1 only: in a first full run no dapo arm, at any alpha or noise, moved
    # pass@1 by more than 0.005; the cheap answer and flat arms still map dapo against alpha.
    meds = lambda alpha, **kw: Arm(f"meds-{alpha:g}", "features", alpha, **kw)  # noqa: E731
    answer = lambda alpha, **kw: Arm(f"answer-{alpha:g}", "answer", alpha, **kw)  # noqa: E731
    every, unfiltered = tuple(ESTIMATORS), ("grpo", "dr_grpo")
    arms = [(Arm("none"), every), (meds(0.1), every)]
    arms += [(meds(a), unfiltered) for a in alphas if a != 0.1]
    arms += [(arm, every) for a in alphas for arm in (answer(a), Arm(f"flat-{a:g}", "flat", a))]
    arms += [(replace(meds(0.1, noise=s), name=f"meds-0.1-noise-{s:g}"), unfiltered) for s in noises]
    arms += [(Arm(f"entropy-{c:g}", entropy=c), every) for c in entropies]
    for c in kls:
        arms += [(Arm(f"kl-{c:g}", kl=c), every), (replace(meds(0.1, kl=c), name=f"kl-{c:g}+meds-0.1"), unfiltered)]
        arms += [(replace(answer(0.1, kl=c), name=f"kl-{c:g}+answer-0.1"), every)]
    one_mode = [Arm("none"), meds(0.1), Arm("flat-0.1", "flat", 0.1)]
    arms += [(replace(arm, name=f"one-mode:{arm.name}", wrong_modes=1), unfiltered) for arm in one_mode]

    # Jobs of up to 10 seeds, the arms with HDBSCAN first so that the cheap ones fill the end evenly.
    chunks = [seeds[i : i + 10] for i in range(0, len(seeds), 10)]
    jobs = [(arm, e, chunk, steps) for arm, estimators in arms for e in estimators for chunk in chunks]
    jobs.sort(key=lambda job: job[0].memory != "features")
    start = time.perf_counter()
    collected = defaultdict(dict)
    with ProcessPoolExecutor(args.workers) as pool:
        for name, estimator, runs in pool.map(run_seeds, jobs):
            collected[estimator].setdefault(name, []).extend(runs)
    seconds = time.perf_counter() - start
    study = {e: {name: outcomes(runs) for name, runs in collected[e].items()} for e in ESTIMATORS}
    runs_total = sum(len(runs) for arms_of in collected.values() for runs in arms_of.values())
    print(f"{runs_total} runs of {steps} steps in {seconds:.0f} s ({args.workers} processes)\n")
    tables = report(study)
    print(tables)

    os.makedirs(args.results, exist_ok=True)
    tag = "_quick" if args.quick else ""
    plot(study, os.path.join(args.results, f"mechanism{tag}.png"))
    saved = {
        "setup": dict(
            start_correct=START_CORRECT,
            wrong_modes=WRONG_MODES,
            dominant=DOMINANT,
            rollouts=ROLLOUTS,
            steps=steps,
            lr=LR,
            seeds=len(seeds),
            seconds=seconds,
        ),
        "arms": {arm.name: {**asdict(arm), "estimators": list(e)} for arm, e in arms},
        "tables": tables,
        "study": {  # per estimator and arm: per-seed outcomes and mean curves, to 5 decimals
            e: {
                name: {part: {m: np.round(v, 5).tolist() for m, v in values.items()} for part, values in o.items()}
                for name, o in arms_of.items()
            }
            for e, arms_of in study.items()
        },
    }
    with open(os.path.join(args.results, f"mechanism{tag}.json"), "w") as f:
        json.dump(saved, f)


if __name__ == "__main__":
    main()
