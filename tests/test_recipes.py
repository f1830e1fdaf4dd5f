"""The recipes in examples/scripts: what each one really hands to ``train_ppo_ray``, read by the real patched parser.

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

import pytest

from tests.inprocess import parse_train_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "scripts"
SLURM = SCRIPTS / "train_meds_ray_slurm.sh"
RECIPES = {  # script: alpha, response tokens, DAPO (dynamic filtering on)
    "train_meds_dapo_qwen2.5_math_7b.sh": SimpleNamespace(alpha=0.1, response=3072, dapo=True),
    "train_meds_dapo_qwen3_4b_base.sh": SimpleNamespace(alpha=0.1, response=7168, dapo=True),
    "train_meds_dapo_qwen3_8b_base.sh": SimpleNamespace(alpha=0.01, response=7168, dapo=True),
    "train_meds_grpo_qwen2.5_math_7b.sh": SimpleNamespace(alpha=0.1, response=3072, dapo=False),
}
QWEN_MATH_PROMPT = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)

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
def submitted(script: str, meds: str = "1") -> SimpleNamespace:
    run = run_recipe(script, MEDS=meds)
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


# ── Shell syntax ──


@recipes
def test_recipe_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)


def test_slurm_script_submits_an_existing_recipe_by_default():
    text = SLURM.read_text()
    assert 'RECIPE="${RECIPE:-train_meds_dapo_qwen2.5_math_7b.sh}"' in text
    assert (SCRIPTS / "train_meds_dapo_qwen2.5_math_7b.sh").is_file()


# ── MEDS on and off ──


@recipes
def test_recipe_turns_meds_on_with_its_alpha(script):
    meds = submitted(script).args.algo.meds
    assert meds.enable is True
    assert meds.alpha == RECIPES[script].alpha
    assert (meds.beta, meds.num_layers, meds.target, meds.anchor) == (None, 14, "wrong", "\\boxed{")


@recipes
def test_meds_0_runs_the_baseline_with_every_other_setting_equal(script):
    with_meds, baseline = flatten(submitted(script).args), flatten(submitted(script, "0").args)
    assert baseline["algo.meds.enable"] is False
    defaults = flatten(parse_train_args(["--reward.remote_url", "rule"]))
    assert all(baseline[k] == v for k, v in defaults.items() if k.startswith("algo.meds."))
    assert not any(flag.startswith("--algo.meds.") or flag == "--meds" for flag in submitted(script, "0").run.flags)
    own_run = ("ckpt.output_dir", "ckpt.path", "logger.tensorboard_dir", "logger.wandb.run_name")
    for key in own_run:  # separate directories, so --ckpt.load_enable never resumes the other run
        assert with_meds[key] != baseline[key]
    same = [k for k in with_meds if not k.startswith("algo.meds.") and k not in own_run]
    assert {k: baseline[k] for k in same} == {k: with_meds[k] for k in same}


@recipes
def test_recipe_rejects_a_meds_switch_other_than_0_or_1(script):
    run = run_recipe(script, MEDS="yes")
    assert run.proc.returncode == 2 and not run.called
    assert "MEDS must be 0 or 1" in run.proc.stderr


# ── The paper's settings (MEDS_SPEC.md §5) ──


@recipes
def test_recipe_samples_512_prompts_times_16_at_temperature_1(script):
    args = submitted(script).args
    assert (args.rollout.batch_size, args.rollout.n_samples_per_prompt) == (512, 16)
    assert (args.rollout.temperature, args.rollout.top_p) == (1.0, 1.0)
    assert args.rollout.max_new_tokens == RECIPES[script].response
    assert args.data.max_len == 1024 + RECIPES[script].response  # prompts are cut to max_len - max_new_tokens


@recipes
def test_recipe_uses_the_papers_loss_and_optimizer(script):
    args = submitted(script).args
    assert args.algo.advantage.estimator == "group_norm"
    assert list(args.actor.eps_clip_low_high) == [0.2, 0.28]
    assert args.actor.loss_agg_mode == "token-mean"
    assert args.algo.kl.init_coef == 0 and not args.algo.kl.use_loss
    assert (args.actor.adam.lr, args.actor.adam.weight_decay, args.actor.max_norm) == (1e-6, 0.1, 1.0)
    assert args.actor.lr_scheduler == "constant_with_warmup"


@recipes
def test_recipe_applies_the_overlong_buffer_of_512_at_factor_1(script):
    args = submitted(script).args
    assert (args.reward.overlong_buffer_len, args.reward.overlong_penalty_factor) == (512, 1.0)


@recipes
def test_dapo_recipes_filter_dynamically_and_grpo_does_not(script):
    algo = submitted(script).args.algo
    assert algo.dynamic_filtering_enable is RECIPES[script].dapo
    if RECIPES[script].dapo:
        assert list(algo.dynamic_filtering_range) == [0.0, 1.0]


@recipes
def test_recipe_renders_the_qwen_math_prompt(script):
    template = submitted(script).args.data.input_template
    assert template.format("What is 1 + 1?") == QWEN_MATH_PROMPT.replace("{question}", "What is 1 + 1?")


@recipes
def test_recipe_rewards_with_the_math_verify_function_shipped_in_its_working_dir(script):
    result = submitted(script)
    working_dir = json.loads(ray_option(result.run.ray_options, "--runtime-env-json"))["working_dir"]
    assert Path(working_dir) == ROOT
    assert result.args.reward.remote_url == ["examples/reward_func_math.py"]
    assert (Path(working_dir) / "examples" / "reward_func_math.py").is_file()


@recipes
def test_recipe_runs_a_colocated_hybrid_engine_with_zero3_on_8_gpus(script):
    args = submitted(script).args
    assert (args.actor.num_nodes, args.actor.num_gpus_per_node) == (1, 8)
    assert (args.vllm.num_engines, args.vllm.tensor_parallel_size) == (8, 1)
    assert args.train.colocate_all and args.vllm.enable_sleep and args.ds.enable_sleep
    assert (args.ds.zero_stage, args.ds.param_dtype) == (3, "bf16")
    assert args.ds.packing_samples and args.actor.gradient_checkpointing_enable


@recipes
def test_recipe_checkpoints_resumably_and_logs(script):
    args = submitted(script).args
    assert args.ckpt.save_steps > 0 and args.ckpt.load_enable
    assert args.ckpt.path.startswith(args.ckpt.output_dir)
    assert args.logger.tensorboard_dir and args.logger.wandb.key is None  # wandb only with WANDB_API_KEY


# ── Environment variables ──


@recipes
def test_warmup_lasts_ten_rl_steps(script, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    num_prompts = 25_600
    dataset.write_text('{"problem": "1 + 1", "answer": "2"}\n' * num_prompts)
    for train_batch_size, episodes in ((512, 1), (512, 4), (8192, 2)):
        run = run_recipe(
            script, DATASET=str(dataset), TRAIN_BATCH_SIZE=str(train_batch_size), NUM_EPISODES=str(episodes)
        )
        assert run.proc.returncode == 0, run.proc.stderr
        args = parse_train_args(run.flags)
        assert args.data.prompt_dataset == str(dataset)
        # openrlhf.trainer.ppo_trainer.prepare_datasets: the scheduler horizon, in optimizer steps
        max_steps = num_prompts * 16 // args.train.batch_size * args.train.num_episodes * args.train.max_epochs
        # DeepspeedStrategy.prepare: num_warmup_steps = ceil(horizon * ratio)
        warmup = math.ceil(max_steps * args.actor.lr_warmup_ratio)
        updates_per_rl_step = 512 * 16 // train_batch_size
        assert warmup == 10 * updates_per_rl_step


@recipes
def test_recipe_spreads_over_the_given_nodes_and_ray_address(script):
    run = run_recipe(script, NUM_NODES="4", GPUS_PER_NODE="8", VLLM_TP="2", RAY_ADDRESS="http://10.0.0.1:8265")
    assert run.proc.returncode == 0, run.proc.stderr
    args = parse_train_args(run.flags)
    assert (args.actor.num_nodes, args.actor.num_gpus_per_node) == (4, 8)
    assert (args.vllm.num_engines, args.vllm.tensor_parallel_size) == (16, 2)
    assert ray_option(run.ray_options, "--address") == "http://10.0.0.1:8265"


@recipes
def test_extra_arguments_reach_the_trainer_last(script):
    run = run_recipe(script, "--ckpt.save_steps", "7", "--eval.steps", "5")
    assert run.proc.returncode == 0, run.proc.stderr
    args = parse_train_args(run.flags)
    assert (args.ckpt.save_steps, args.eval.steps) == (7, 5)
