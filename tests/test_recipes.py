"""The recipes in examples/scripts: what each one really hands to ``train_ppo_ray``, read by the real patched parser,
checked against a table of the MEDS authors' settings; and the zero-alpha baseline, run through the glue.

Each recipe runs under bash with a stand-in ``ray`` first on PATH. The stand-in does what ``ray job submit`` of
Ray 2.x does with the entrypoint — ``subprocess.list2cmdline`` of the words after ``--``, run by the job supervisor
through ``/bin/sh`` — but with a ``python3`` on that shell's PATH which writes its argv, NUL-separated, to a file.
So the flags checked here are the argv the trainer would get on a cluster, quoting included; they then go
through upstream's parser and validation plus MEDS's (``parse_train_args``). No Ray cluster is needed.
"""

import atexit
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Tuple, Union

import numpy as np
import pytest
import torch

from meds_patch.core.config import MEDSConfig
from meds_patch.core.penalty import apply_penalties, penalty_term
from tests.inprocess import parse_train_args

# The glue's experience-maker fixtures: a patched and a pristine upstream maker, and a 4-rollout step.
from tests.test_openrlhf_glue import experiences, maker_for, makers  # noqa: F401 (makers is a fixture)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "scripts"
RECIPES = {  # script: the MEDS arm's alpha, the response length and where both come from
    "train_meds_qwen2.5_math_7b.sh": SimpleNamespace(
        alpha=0.1, response=3072, source="run_meds.sh: penalty_coef=0.1, max_response_length=3072"
    ),
    "train_meds_qwen3_4b_base.sh": SimpleNamespace(
        alpha=0.1, response=7168, source="docs/ALGORITHM.md §4-5 (the paper); run_grpo.sh: max_response_length=7168"
    ),
    "train_meds_qwen3_8b_base.sh": SimpleNamespace(
        alpha=0.01, response=7168, source="docs/ALGORITHM.md §4 (alpha 0.005-0.02), §5; run_grpo.sh: 7168"
    ),
}
ALGOS = ("dapo", "grpo", "grpo_entropy_adv")
QWEN_MATH_PROMPT = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)


def updates_per_rl_step(args) -> int:
    return args.rollout.batch_size * args.rollout.n_samples_per_prompt // args.train.batch_size


class Setting(NamedTuple):
    arms: Tuple[str, ...]
    what: str
    read: Union[str, Callable[[Any], Any]]  # a dotted key of the parsed arguments, or a function of them
    expected: Any
    source: str


EVERY = ALGOS
ENTROPY = ("grpo_entropy_adv",)
# The authors' settings, one row each (github.com/Linxi000/MEDS, recipe/MEDS/: run_meds.sh and run_dapo.sh for
# the DAPO arm, run_grpo.sh for the GRPO arm, run_grpo_entropy_adv.sh for the entropy-advantage arm). "verl
# default" rows are settings their scripts leave at the default of veRL's config files in their fork
# (verl/trainer/config/).
AUTHORS = [
    Setting(EVERY, "advantage", "algo.advantage.estimator", "group_norm", "all three: algorithm.adv_estimator=grpo"),
    Setting(EVERY, "prompts per step", "rollout.batch_size", 512, "train_prompt_bsz=512; data.train_batch_size=512"),
    Setting(EVERY, "rollouts per prompt", "rollout.n_samples_per_prompt", 16, "n_resp_per_prompt=16; rollout.n=16"),
    Setting(EVERY, "prompt tokens", lambda a: a.data.max_len - a.rollout.max_new_tokens, 1024,
            "all three: data.max_prompt_length=1024"),  # fmt: skip
    Setting(EVERY, "temperature", "rollout.temperature", 1.0, "all three: rollout.temperature=1.0"),
    Setting(EVERY, "top_p", "rollout.top_p", 1.0, "all three: rollout.top_p=1.0"),
    Setting(EVERY, "epochs per batch", "train.max_epochs", 1, "verl default actor.ppo_epochs=1"),
    Setting(EVERY, "lr", "actor.adam.lr", 1e-6, "all three: actor.optim.lr=1e-6"),
    Setting(EVERY, "Adam betas", "actor.adam.betas", (0.9, 0.999), "verl default optim.betas=[0.9, 0.999]"),
    Setting(EVERY, "grad clip", "actor.max_norm", 1.0, "run_meds.sh: actor.grad_clip=1.0; verl default 1.0"),
    Setting(EVERY, "entropy bonus", lambda a: bool(a.actor.entropy_coef), False, "all three: actor.entropy_coeff=0"),
    Setting(EVERY, "gradient checkpointing", "actor.gradient_checkpointing_enable", True,
            "all three: model.enable_gradient_checkpointing=True"),  # fmt: skip
    Setting(EVERY, "GPUs", lambda a: a.actor.num_nodes * a.actor.num_gpus_per_node, 8,
            "all three: trainer.n_gpus_per_node=8, NNODES=1"),  # fmt: skip
    Setting(EVERY, "vLLM tensor parallel", "vllm.tensor_parallel_size", 1, "rollout.tensor_model_parallel_size=1"),
    Setting(EVERY, "eval data", lambda a: Path(a.eval.dataset).name, "aime24.jsonl", "TEST_FILE=aime-2024.parquet"),
    Setting(EVERY, "eval every", "eval.steps", 2, "all three: trainer.test_freq=2"),
    Setting(EVERY, "eval samples", "eval.n_samples_per_prompt", 1, "run_meds.sh: val_kwargs.n=1; verl default 1"),
    Setting(EVERY, "checkpoint every", "ckpt.save_steps", 50, "all three: trainer.save_freq=50"),
    Setting(EVERY, "best-eval checkpoints", "ckpt.best_metric_key", "none", "veRL saves at save_freq only"),
    Setting(EVERY, "epochs", "train.num_episodes", 100, "trainer.total_epochs=100"),
    Setting(EVERY, "MEDS layers", "algo.meds.num_layers", 14, "run_meds.sh: use_last_n_layers=14"),
    Setting(EVERY, "MEDS target", "algo.meds.target", "wrong", "run_meds.sh: cluster_penalty_target=wrong"),
    Setting(("dapo",), "KL", "algo.kl.init_coef", 0.0, "use_kl_loss=False, kl_coef=0.0, use_kl_in_reward=False"),
    Setting(("dapo",), "KL loss", "algo.kl.use_loss", False, "run_meds.sh: use_kl_loss=False"),
    Setting(("dapo",), "clip", "actor.eps_clip_low_high", (0.2, 0.28), "clip_ratio_low=0.2, clip_ratio_high=0.28"),
    Setting(("dapo",), "dual clip", "actor.dual_clip", 10.0, "run_meds.sh: actor.clip_ratio_c=10.0"),
    Setting(("dapo",), "loss aggregation", "actor.loss_agg_mode", "token-mean", "loss_agg_mode=token-mean"),
    Setting(("dapo",), "overlong buffer", "reward.overlong_buffer_len", 512, "overlong_buffer.len=512"),
    Setting(("dapo",), "overlong factor", "reward.overlong_penalty_factor", 1.0, "overlong_penalty_factor=1.0"),
    Setting(("dapo",), "group filter", "algo.dynamic_filtering_enable", True, "filter_groups.enable=True"),
    Setting(("dapo",), "group filter range", "algo.dynamic_filtering_range", (0.0, 1.0),
            "filter_groups.metric=acc: drops all-right and all-wrong groups"),  # fmt: skip
    Setting(("dapo",), "updates per RL step", updates_per_rl_step, 32,
            "run_meds.sh: ppo_mini_batch_size=16 prompts"),  # fmt: skip
    Setting(("dapo",), "weight decay", "actor.adam.weight_decay", 0.1, "run_meds.sh: optim.weight_decay=0.1"),
    Setting(("dapo",), "lr schedule", "actor.lr_scheduler", "constant_with_warmup",
            "optim.lr_warmup_steps=10, verl default lr_scheduler_type=constant"),  # fmt: skip
    Setting(("dapo",), "eval temperature", "eval.temperature", 1.0, "run_meds.sh: val_kwargs.temperature=1.0"),
    Setting(("grpo",), "KL loss", "algo.kl.use_loss", True, "run_grpo.sh: use_kl_loss=True"),
    Setting(("grpo",), "KL coefficient", "algo.kl.init_coef", 0.001, "run_grpo.sh: kl_loss_coef=0.001"),
    Setting(("grpo",), "KL estimator", "algo.kl.estimator", "k3", "run_grpo.sh: kl_loss_type=low_var_kl"),
    Setting(("grpo",), "reference offload", "ref.offload", True, "run_grpo.sh: ref.fsdp_config.param_offload=True"),
    Setting(("grpo",), "clip", "actor.eps_clip_low_high", (0.2, 0.2), "verl default clip_ratio_low/high=0.2"),
    Setting(("grpo",), "dual clip", "actor.dual_clip", 3.0, "verl default actor.clip_ratio_c=3.0"),
    Setting(("grpo",), "loss aggregation", "actor.loss_agg_mode", "seq-mean-token-mean",
            "run_grpo.sh: loss_agg_mode=seq-mean-token-mean"),  # fmt: skip
    Setting(("grpo",), "overlong buffer", "reward.overlong_buffer_len", None, "verl default reward_manager=naive"),
    Setting(("grpo",), "group filter", "algo.dynamic_filtering_enable", False, "verl.trainer.main_ppo: none"),
    Setting(("grpo",), "updates per RL step", updates_per_rl_step, 16,
            "run_grpo.sh: ppo_mini_batch_size=32 prompts"),  # fmt: skip
    Setting(("grpo",), "weight decay", "actor.adam.weight_decay", 0.01, "verl default optim.weight_decay=0.01"),
    Setting(("grpo",), "lr schedule", "actor.lr_scheduler", "constant",
            "verl default lr_warmup_steps=-1, lr_warmup_steps_ratio=0.0, lr_scheduler_type=constant"),  # fmt: skip
    Setting(ENTROPY, "entropy advantage", "algo.entropy_advantage.enable", True, "+actor.use_entropy_advantage=True"),
    Setting(ENTROPY, "entropy advantage alpha, kappa",
            lambda a: (a.algo.entropy_advantage.alpha, a.algo.entropy_advantage.kappa), (0.4, 2.0),
            "dp_actor.py: advantages += min(0.4 * entropy, |advantages| / 2)"),  # fmt: skip
    Setting(ENTROPY, "KL loss", "algo.kl.use_loss", True, "run_grpo_entropy_adv.sh: use_kl_loss=True"),
    Setting(ENTROPY, "KL coefficient", "algo.kl.init_coef", 0.001, "kl_loss_coef=0.001"),
    Setting(ENTROPY, "KL estimator", "algo.kl.estimator", "k3", "verl default kl_loss_type=low_var_kl"),
    Setting(ENTROPY, "reference offload", "ref.offload", False, "offload=False: ref.fsdp_config.param_offload"),
    Setting(ENTROPY, "clip", "actor.eps_clip_low_high", (0.2, 0.2), "clip_ratio_low=0.2, clip_ratio_high=0.2"),
    Setting(ENTROPY, "dual clip", "actor.dual_clip", 10.0, "run_grpo_entropy_adv.sh: clip_ratio_c=10.0"),
    Setting(ENTROPY, "loss aggregation", "actor.loss_agg_mode", "seq-mean-token-mean",
            "run_grpo_entropy_adv.sh: loss_agg_mode=seq-mean-token-mean"),  # fmt: skip
    Setting(ENTROPY, "overlong buffer", "reward.overlong_buffer_len", None, "enable_overlong_buffer=False"),
    Setting(ENTROPY, "group filter", "algo.dynamic_filtering_enable", False, "enable_filter_groups=False"),
    Setting(ENTROPY, "updates per RL step", updates_per_rl_step, 32, "train_prompt_mini_bsz=16 prompts"),
    Setting(ENTROPY, "weight decay", "actor.adam.weight_decay", 0.1, "optim.weight_decay=0.1"),
    Setting(ENTROPY, "lr schedule", "actor.lr_scheduler", "constant_with_warmup", "optim.lr_warmup_steps=10"),
]

RAY_STUB = """#!{python}
import json, os, subprocess, sys

args = sys.argv[1:]
if args[:2] != ["job", "submit"] or "--" not in args:
    sys.exit("stand-in ray: only `ray job submit [options] -- entrypoint` is expected, got %r" % args)
cut = args.index("--")
with open(os.environ["STUB_OUT"] + ".ray.json", "w") as fh:
    json.dump(args[2:cut], fh)
entrypoint = subprocess.list2cmdline(args[cut + 1 :])  # ray/dashboard/modules/job/cli.py
env = dict(os.environ, PATH=os.environ["STUB_ENTRY_PATH"] + os.pathsep + os.environ["PATH"])
sys.exit(subprocess.run(entrypoint, shell=True, env=env).returncode)  # job_supervisor.py: shell=True
"""
PYTHON3_STUB = """#!{python}
import os, sys

with open(os.environ["STUB_OUT"], "wb") as fh:
    fh.write(b"\\0".join(os.fsencode(arg) for arg in sys.argv[1:]))
"""


@functools.lru_cache(maxsize=None)
def stub_dirs() -> tuple:
    base = Path(tempfile.mkdtemp(prefix="meds-recipe-stubs-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    dirs = []
    for name, text in (("ray", RAY_STUB), ("python3", PYTHON3_STUB)):
        folder = base / name
        folder.mkdir()
        (folder / name).write_text(text.replace("{python}", sys.executable))
        (folder / name).chmod(0o755)
        dirs.append(str(folder))
    (base / "home").mkdir()  # one HOME for every run, so default paths are comparable between runs
    return (*dirs, str(base / "home"))


def run_recipe(script: str, *extra: str, **env: str) -> SimpleNamespace:
    """Run ``script`` as a user would, in a clean environment; return its Ray options and the trainer's argv."""
    ray_dir, python3_dir, home = stub_dirs()
    with tempfile.TemporaryDirectory(prefix="meds-recipe-") as tmp:
        out = os.path.join(tmp, "argv")
        environment = {
            "PATH": ray_dir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "STUB_OUT": out,
            "STUB_ENTRY_PATH": python3_dir,
            **env,
        }
        proc = subprocess.run(
            ["bash", str(SCRIPTS / script), *extra], env=environment, capture_output=True, text=True, cwd=tmp
        )
        called = os.path.exists(out)
        ray_options = json.load(open(out + ".ray.json")) if called else None
        words = open(out, "rb").read().split(b"\0") if called else []
    argv = [os.fsdecode(word) for word in words]
    module = ["-m", "openrlhf.cli.train_ppo_ray"]
    assert not called or argv[:2] == module, f"python3 was not called with {module}: {argv[:4]}"
    return SimpleNamespace(proc=proc, called=called, ray_options=ray_options, flags=argv[2:])


@functools.lru_cache(maxsize=None)
def submitted(script: str, algo: str = "dapo", meds: str = "1") -> SimpleNamespace:
    run = run_recipe(script, ALGO=algo, MEDS=meds)
    assert run.proc.returncode == 0, run.proc.stderr
    return SimpleNamespace(run=run, args=parse_train_args(run.flags))


def flatten(namespace, prefix="") -> dict:
    items = {}
    for key, value in vars(namespace).items():
        if isinstance(value, SimpleNamespace):
            items.update(flatten(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def ray_option(options: list, name: str) -> str:
    values = [opt.split("=", 1)[1] for opt in options if opt.startswith(f"{name}=")]
    assert len(values) == 1, options
    return values[0]


recipes = pytest.mark.parametrize("script", sorted(RECIPES))
arms = pytest.mark.parametrize("script,algo", [(script, algo) for script in sorted(RECIPES) for algo in ALGOS])


# ── Shell syntax and switches ──


@recipes
def test_recipe_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


@recipes
def test_recipe_rejects_a_meds_switch_other_than_0_or_1(script):
    run = run_recipe(script, MEDS="yes")
    assert run.proc.returncode == 2 and not run.called
    assert "MEDS must be 0 or 1" in run.proc.stderr


@recipes
def test_recipe_rejects_an_algorithm_it_does_not_know(script):
    run = run_recipe(script, ALGO="ppo")
    assert run.proc.returncode == 2 and not run.called
    assert "ALGO must be dapo, grpo or grpo_entropy_adv, got 'ppo'" in run.proc.stderr


# ── The authors' settings ──


@pytest.mark.parametrize(
    "script,setting",
    [(script, setting) for script in sorted(RECIPES) for setting in AUTHORS],
    ids=[f"{script}-{'+'.join(s.arms)}-{s.what}" for script in sorted(RECIPES) for s in AUTHORS],
)
def test_baseline_matches_the_authors_setting(script, setting):
    for algo in setting.arms:  # the baselines are the authors' runs: run_dapo.sh, run_grpo.sh, run_grpo_entropy_adv.sh
        args = submitted(script, algo, "0").args
        value = setting.read(args) if callable(setting.read) else flatten(args)[setting.read]
        value = tuple(value) if isinstance(value, list) else value
        assert value == setting.expected, f"{algo}: {setting.what} is {value!r}; the authors: {setting.source}"


@arms
def test_recipe_generates_the_authors_response_length(script, algo):
    # Qwen2.5-Math-7B's 4096-token context caps both arms at 3072 (run_grpo.sh's 7168 is for the Qwen3 models).
    assert submitted(script, algo).args.rollout.max_new_tokens == RECIPES[script].response, RECIPES[script].source


@recipes
def test_warmup_lasts_ten_rl_steps(script, tmp_path):
    # optim.lr_warmup_steps=10 (run_meds.sh) counts RL steps; 0.11.2 counts optimizer steps.
    dataset = tmp_path / "prompts.jsonl"
    num_prompts = 25_600
    dataset.write_text('{"problem": "1 + 1", "answer": "2"}\n' * num_prompts)
    for algo, extra, episodes in (("dapo", (), 1), ("dapo", (), 100), ("dapo", ("--train.batch_size", "8192"), 2),
                                  ("grpo_entropy_adv", (), 100)):  # fmt: skip
        run = run_recipe(script, *extra, DATASET=str(dataset), NUM_EPISODES=str(episodes), ALGO=algo)
        assert run.proc.returncode == 0, run.proc.stderr
        args = parse_train_args(run.flags)
        assert args.data.prompt_dataset == str(dataset)
        # openrlhf.trainer.ppo_trainer.prepare_datasets: the scheduler horizon, in optimizer steps
        max_steps = num_prompts * 16 // args.train.batch_size * args.train.num_episodes * args.train.max_epochs
        # DeepspeedStrategy.prepare: num_warmup_steps = ceil(horizon * ratio)
        warmup = math.ceil(max_steps * args.actor.lr_warmup_ratio)
        assert warmup == 10 * (512 * 16 // args.train.batch_size)


@recipes
def test_every_algorithm_evaluates_alike(script):
    # run_grpo.sh leaves veRL's greedy validation; one setting (run_meds.sh's) keeps the arms comparable.
    evaluations = [{k: v for k, v in flatten(submitted(script, algo).args).items() if k.startswith("eval.")}
                   for algo in ALGOS]  # fmt: skip
    assert all(evaluation == evaluations[0] for evaluation in evaluations[1:])


@recipes
def test_eval_data_sits_beside_the_training_data_unless_given(script, tmp_path):
    beside = run_recipe(script, DATASET=str(tmp_path / "train.jsonl"))
    given = run_recipe(script, EVAL_DATASET="/data/aime25.jsonl,/data/amc23.jsonl")
    assert parse_train_args(beside.flags).eval.dataset == str(tmp_path / "aime24.jsonl")
    assert parse_train_args(given.flags).eval.dataset == "/data/aime25.jsonl,/data/amc23.jsonl"


# ── MEDS on and off: both arms log the same diagnostics ──


@arms
def test_meds_arm_penalises_wrong_answers_with_the_recipes_alpha(script, algo):
    meds = submitted(script, algo).args.algo.meds
    assert meds.enable is True
    assert meds.alpha == RECIPES[script].alpha
    assert (meds.beta, meds.num_layers, meds.target, meds.anchor) == (None, 14, "wrong", "\\boxed{")


@arms
def test_baseline_arm_runs_the_meds_glue_with_a_zero_penalty_cap(script, algo):
    meds = submitted(script, algo, "0").args.algo.meds
    assert meds.enable is True  # so train/meds/* and eval_unbiased_pass@k are logged as in the MEDS arm
    assert meds.alpha == 0 and MEDSConfig(alpha=meds.alpha, beta=meds.beta).penalty_cap == 0


@arms
def test_meds_and_baseline_arms_differ_only_in_alpha_and_run_directories(script, algo):
    with_meds, baseline = flatten(submitted(script, algo).args), flatten(submitted(script, algo, "0").args)
    own_run = ("ckpt.output_dir", "ckpt.path", "logger.tensorboard_dir", "logger.wandb.run_name")
    for key in own_run:  # separate directories, so --ckpt.load_enable never resumes the other run
        assert with_meds[key] != baseline[key]
    same = [k for k in with_meds if k != "algo.meds.alpha" and k not in own_run]
    assert {k: baseline[k] for k in same} == {k: with_meds[k] for k in same}


@recipes
def test_every_arm_writes_to_its_own_directory(script):
    paths = {submitted(script, algo, meds).args.ckpt.path for algo in ALGOS for meds in "01"}
    assert len(paths) == 2 * len(ALGOS)


def two_steps(maker):
    """The same 4-rollout step twice (3 wrong answers near one another): the second one meets its own past."""
    features = [[1, 0], [1, 0.01], [0.9, 0.1], [0, 1]]
    rewards = [0.0, 0.0, 0.0, 1.0]
    maker.compute_advantages_and_returns(experiences(rewards, rewards, features))
    return maker.compute_advantages_and_returns(experiences(rewards, rewards, features))[0]


def test_zero_alpha_leaves_every_reward_and_advantage_bit_identical(makers):
    patched, pristine = makers
    baseline = maker_for(patched, "group_norm", meds=True)
    baseline.args.algo.meds.alpha = 0.0
    ours = two_steps(baseline)
    theirs = two_steps(maker_for(pristine, "group_norm", meds=False))
    for field in ("rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=0, atol=0)
    assert baseline.meds_state.last_step.wrong == 3  # the wrong answers did go through the memory


def test_the_same_steps_with_the_recipes_alpha_change_the_rewards(makers):
    # What the zero-alpha test would see if alpha 0 did not switch the penalty off.
    patched, pristine = makers
    ours = two_steps(maker_for(patched, "group_norm", meds=True))
    theirs = two_steps(maker_for(pristine, "group_norm", meds=False))
    assert (ours.rewards[:3] < theirs.rewards[:3]).all() and ours.rewards[3] == theirs.rewards[3]


def test_zero_alpha_still_measures_how_varied_the_wrong_answers_are(makers):
    from meds_patch.integration.glue import step_metrics

    patched, _ = makers
    baseline = maker_for(patched, "group_norm", meds=True)
    baseline.args.algo.meds.alpha = 0.0
    two_steps(baseline)
    metrics = step_metrics(baseline)
    # Wrong rollouts 0, 1, 2 answered \boxed{0}, \boxed{1}, \boxed{0} (the step's answer tokens): 2 distinct.
    assert metrics["meds/wrong_answers_distinct_per_question"] == 2
    assert metrics["meds/stored_vectors"] == 6 and metrics["meds/penalised_wrong_share"] == 0


def test_apply_penalties_with_zero_alpha_returns_the_same_bits():
    rewards = np.array([0.0, -0.0, 1.0, -0.3125, 1e-40, -7.5, 3.4e38, 0.1], dtype=np.float32)
    correct = np.array([False, False, True, False, False, True, False, True])
    sizes = np.array([0, 5, 3, 1, 200, 2, 9, 0])
    p = penalty_term(sizes, 0.0, MEDSConfig(alpha=0.0).penalty_cap)
    shaped = apply_penalties(torch.from_numpy(rewards), correct, p)
    assert shaped.dtype == torch.float32
    assert np.array_equal(shaped.numpy().view(np.uint32), rewards.view(np.uint32))


# ── Cluster, data and logging ──


@recipes
def test_recipe_renders_the_qwen_math_prompt(script):
    template = submitted(script).args.data.input_template
    assert template.format("What is 1 + 1?") == QWEN_MATH_PROMPT.replace("{question}", "What is 1 + 1?")


@recipes
def test_the_cpu_recipe_model_was_trained_under_the_recipes_prompt(script):
    # demo --recipe's tiny model learns to answer under tiny_math.QWEN_MATH_TEMPLATE: it must be the recipe's.
    from meds_patch.cpu.tiny_math import QWEN_MATH_TEMPLATE

    template = submitted(script).args.data.input_template
    assert template.format("what is 2 + 3?") == QWEN_MATH_TEMPLATE.format("what is 2 + 3?")


@recipes
def test_recipe_rewards_with_the_math_verify_function_shipped_in_its_working_dir(script):
    result = submitted(script)
    working_dir = json.loads(ray_option(result.run.ray_options, "--runtime-env-json"))["working_dir"]
    assert Path(working_dir) == ROOT
    assert result.args.reward.remote_url == ["examples/reward_func_math.py"]
    assert (Path(working_dir) / "examples" / "reward_func_math.py").is_file()


@arms
def test_recipe_runs_a_colocated_hybrid_engine_with_zero3_on_8_gpus(script, algo):
    args = submitted(script, algo).args
    assert (args.actor.num_nodes, args.actor.num_gpus_per_node) == (1, 8)
    assert (args.vllm.num_engines, args.vllm.tensor_parallel_size) == (8, 1)
    assert args.train.colocate_all and args.vllm.enable_sleep and args.ds.enable_sleep
    assert (args.ds.zero_stage, args.ds.param_dtype) == (3, "bf16")
    assert args.ds.packing_samples and args.actor.gradient_checkpointing_enable


@recipes
def test_recipe_spreads_actor_reference_and_vllm_over_the_given_nodes(script):
    # train_ppo_ray.train asserts that a colocated reference model (GRPO's KL loss) has the actor's shape.
    run = run_recipe(script, ALGO="grpo", NUM_NODES="4", GPUS_PER_NODE="8", VLLM_TP="2")
    assert run.proc.returncode == 0, run.proc.stderr
    args = parse_train_args(run.flags)
    assert (args.actor.num_nodes, args.actor.num_gpus_per_node) == (4, 8)
    assert (args.ref.num_nodes, args.ref.num_gpus_per_node) == (4, 8)
    assert (args.vllm.num_engines, args.vllm.tensor_parallel_size) == (16, 2)


@recipes
def test_recipe_submits_to_the_given_ray_address(script):
    run = run_recipe(script, RAY_ADDRESS="http://10.0.0.1:8265")
    assert run.proc.returncode == 0, run.proc.stderr
    assert ray_option(run.ray_options, "--address") == "http://10.0.0.1:8265"


@recipes
def test_recipe_checkpoints_resumably_and_logs_to_tensorboard(script):
    args = submitted(script).args
    assert args.ckpt.load_enable and args.ckpt.path.startswith(args.ckpt.output_dir)
    assert args.logger.tensorboard_dir and args.logger.wandb.key is None  # wandb only with WANDB_API_KEY


@recipes
def test_wandb_key_reaches_no_command_line(script):
    run = run_recipe(script, WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567")
    assert run.proc.returncode == 0, run.proc.stderr
    assert not any("0123456789abcdef" in word for word in [*run.ray_options, *run.flags])
    args = parse_train_args(run.flags)
    assert args.logger.wandb.key == "from-environment"  # non-empty: upstream's wandb logger starts


@recipes
def test_extra_arguments_reach_the_trainer_last(script):
    run = run_recipe(script, "--ckpt.save_steps", "7", "--eval.steps", "5")
    assert run.proc.returncode == 0, run.proc.stderr
    args = parse_train_args(run.flags)
    assert (args.ckpt.save_steps, args.eval.steps) == (7, 5)
