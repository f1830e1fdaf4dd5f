"""What the CPU benches of DAPO on two-digit sums share: the task, its fine-tuned model, train_ppo_ray's arguments,
and a run with what it logged (collapse_ablation.py, collapse_experiment.py, step_overhead.py).

A bench writes its prompt sets into a work folder and gives each run a folder of its own inside it:
WORK/train.jsonl, WORK/heldout.jsonl, WORK/RUN/job.log, WORK/RUN/tensorboard, ...
"""

import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

from meds_patch.cpu.cluster import CPU_FLAGS, REWARD_FUNC, LocalRayCluster, scalar_events, scalars, submit
from meds_patch.cpu.tiny_math import PROMPT, tuned_model


def questions(family: str) -> List[Tuple[int, int]]:
    """Two-digit sums a + b whose tens do not overflow (tens digits 1..8 summing to <= 8): the "carry" family's
    units sum to 10 or more, the "nocarry" family's to 9 or less."""
    return [
        (10 * a1 + a0, 10 * b1 + b0)
        for a1 in range(1, 9) for b1 in range(1, 9) if a1 + b1 <= 8
        for a0 in range(1, 10) for b0 in range(1, 10) if (a0 + b0 >= 10) == (family == "carry")
    ]  # fmt: skip


def solution(a: int, b: int, mode: str) -> str:
    """A worked answer in two steps: "right", "dropped_carry" (the carry forgotten), "units_slip" (one too many in
    the units, the rest right) or "spurious_carry" (a carry where the units do not overflow)."""
    units, tens = a % 10 + b % 10, a // 10 + b // 10
    carry = mode in ("right", "units_slip", "spurious_carry") if units >= 10 else mode == "spurious_carry"
    shown = units + (mode == "units_slip")
    steps = (
        f"{shown}, carry 1. {a // 10} + {b // 10} + 1 = {tens + 1}"
        if carry
        else f"{shown}. {a // 10} + {b // 10} = {tens}"
    )
    total = 10 * (tens + carry) + shown % 10
    return f" {a % 10} + {b % 10} = {steps}. So the answer is \\boxed{{{total}}}."


def sums_model(name: str, sft_mix: Dict[str, Sequence[Tuple[str, float]]]) -> str:
    """The tiny Qwen2 fine-tuned 1200 steps on every question of each family in ``sft_mix`` ({family: ((mode,
    weight), ...)}), 8 solutions each, their modes drawn with those weights (seeded); built once and cached."""
    rng, corpus = random.Random(0), []
    for family, mix in sft_mix.items():
        modes, weights = zip(*mix)
        corpus += [PROMPT.format(a=a, b=b) + solution(a, b, rng.choices(modes, weights)[0])
                   for a, b in questions(family) for _ in range(8)]  # fmt: skip
    return tuned_model(name, corpus, steps=1200, batch_size=32)


def dapo_args(
    model: str,
    folder: str,
    *,
    seed: int,
    episodes: int,
    run_name: str,
    alpha: Optional[float] = None,
    lr: float = 1e-4,
    max_new_tokens: int = 48,
    eval_steps: Optional[int] = None,
    eval_samples: int = 8,
    dynamic_filtering: bool = True,
) -> List[str]:
    """train_ppo_ray's arguments for a DAPO run of ``model`` on CPU in ``folder``, on WORK/train.jsonl: 8 prompts x 8
    rollouts a step, temperature 1, constant ``lr``. ``alpha``: MEDS's (4 layers), None for no MEDS; ``eval_steps``:
    evaluate ``eval_samples`` samples of each WORK/heldout.jsonl question every so many steps, None for never;
    ``dynamic_filtering`` False keeps every group, so each step does the same work."""
    evaluation = [
        "--eval.dataset", os.path.join(folder, "..", "heldout.jsonl"), "--eval.steps", str(eval_steps),
        "--eval.n_samples_per_prompt", str(eval_samples), "--eval.temperature", "1.0",
    ]  # fmt: skip
    filtering = ["--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0", "1"]
    meds = ["--meds", "--algo.meds.num_layers", "4", "--algo.meds.alpha", str(alpha)]
    return [
        "--actor.model_name_or_path", model, "--reward.remote_url", REWARD_FUNC,
        "--data.prompt_dataset", os.path.join(folder, "..", "train.jsonl"),
        "--data.input_key", "prompt", "--data.label_key", "label", *(evaluation if eval_steps is not None else []),
        "--data.max_len", "160", "--rollout.max_new_tokens", str(max_new_tokens),
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1", *CPU_FLAGS,
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        # DAPO: group-normalised advantages, dynamic filtering, clip-higher, token-mean, no KL.
        "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
        *(filtering if dynamic_filtering else []),
        "--actor.eps_clip_low_high", "0.2", "0.28", "--actor.loss_agg_mode", "token-mean",
        "--actor.entropy_coef", "0",  # entropy logged, not trained on
        "--rollout.batch_size", "8", "--rollout.n_samples_per_prompt", "8", "--rollout.micro_batch_size", "16",
        "--train.batch_size", "64", "--train.micro_batch_size", "16", "--rollout.temperature", "1.0",
        "--train.num_episodes", str(episodes), "--train.seed", str(seed),
        "--actor.adam.lr", str(lr), "--actor.lr_scheduler", "constant",
        "--ckpt.path", os.path.join(folder, "ckpt"), "--ckpt.output_dir", os.path.join(folder, "model"),
        "--logger.tensorboard_dir", os.path.join(folder, "tensorboard"), "--logger.wandb.run_name", run_name,
        *(meds if alpha is not None else []),
    ]  # fmt: skip


def train_ppo_ray(cluster: LocalRayCluster, args: List[str], folder: str) -> Dict[str, Dict[int, float]]:
    """Run train_ppo_ray with ``args`` on ``cluster``, its output in ``folder``/job.log, and return what it logged;
    a failed run ends the bench."""
    os.makedirs(folder, exist_ok=True)
    if submit(cluster, args, os.path.join(folder, "job.log"), on_line=lambda line: None) != 0:
        raise SystemExit(f"train_ppo_ray failed in {folder}: see {folder}/job.log")
    return logged(folder)


def logged(folder: str) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} of every scalar the run in ``folder`` logged to TensorBoard, steps in order."""
    values: Dict[str, Dict[int, float]] = {}
    for step, tags in sorted(scalars(os.path.join(folder, "tensorboard")).items()):
        for tag, value in tags.items():
            values.setdefault(tag, {})[step] = value
    return values


def step_times(folder: str) -> Dict[int, float]:
    """{step: the wall-clock time at which the run in ``folder`` logged it} (its train/reward event)."""
    events = scalar_events(os.path.join(folder, "tensorboard"), "train/reward")
    return {event.step: event.wall_time for tag, event in events if tag == "train/reward"}


def step_intervals(times: Dict[int, float], eval_steps: Optional[int] = None) -> List[float]:
    """Seconds between consecutive steps' logs (``step_times``), leaving out the steps next to an evaluation."""
    steps = sorted(times)
    evaluated = {step for step in steps if eval_steps is not None and step % eval_steps == 0}
    return [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1 and not {a, b} & evaluated]
