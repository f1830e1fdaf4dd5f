"""``python -m meds_patch demo``: a few MEDS steps of the real, patched OpenRLHF path on one CPU.

A GPU run cannot happen here: the model actors need CUDA and rollouts need vLLM. So this stands in for exactly
those: vLLM and flash-attn's compiled extension become empty modules (imported, never called), the policy
actor runs in-process with ``torch.cuda.current_device`` answering "cpu", and rollouts come from Hugging Face
``generate`` on a tiny random model. Everything else is upstream's code with the series applied: the CLI
parser and its validation, ``PolicyModelActor.forward``, ``make_experience``, ``compute_advantages_and_returns``
and the trainer's checkpoint save/restore. The tests drive the same functions.
"""

import functools
import importlib.machinery
import os
import re
import sys
import tempfile
import time
import types
import uuid
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch

ANSWER_RE = re.compile(r"\\boxed\{([^{}]*)\}")


# ── Stand-ins for what a CPU machine cannot install ──


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # find_spec must not raise
    module.__path__ = []
    return module


def _unavailable(*args, **kwargs):
    raise RuntimeError("vLLM is not installed on this machine (CPU stand-in)")


def install_stand_ins() -> None:
    """Empty ``vllm`` and ``flash_attn_2_cuda`` modules, so OpenRLHF's module-level imports succeed on CPU."""
    try:
        import flash_attn_2_cuda  # noqa: F401
    except ImportError:
        sys.modules["flash_attn_2_cuda"] = _module("flash_attn_2_cuda")
    try:
        import vllm  # noqa: F401

        return
    except ImportError:
        pass
    names = ["vllm", "vllm.inputs", "vllm.utils", "vllm.distributed", "vllm.distributed.utils",
             "vllm.distributed.device_communicators", "vllm.distributed.device_communicators.pynccl"]  # fmt: skip
    for name in names:
        sys.modules[name] = _module(name)
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], leaf, sys.modules[name])
    vllm = sys.modules["vllm"]
    vllm.__version__ = "0.0.0+cpu-stand-in"
    vllm.SamplingParams = type("SamplingParams", (), {"__init__": lambda self, **kw: self.__dict__.update(kw)})
    vllm.LLM = vllm.AsyncEngineArgs = _unavailable
    vllm.AsyncLLMEngine = type("AsyncLLMEngine", (), {"from_engine_args": staticmethod(_unavailable)})
    sys.modules["vllm.inputs"].TokensPrompt = dict
    sys.modules["vllm.utils"].random_uuid = lambda: uuid.uuid4().hex
    sys.modules["vllm.distributed.utils"].StatelessProcessGroup = _unavailable
    sys.modules["vllm.distributed.device_communicators.pynccl"].PyNcclCommunicator = _unavailable


# ── A tiny tokenizer and model, built on the fly ──

CORPUS = [
    f"Question: what is {a} + {b}? Please reason step by step, and put your final answer within \\boxed{{}}. "
    f"Answer: {a} + {b} = {a + b}, so the answer is \\boxed{{{a + b}}}."
    for a in range(12)
    for b in range(12)
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


def tiny_model(tokenizer, arch: str = "qwen2", num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **config)).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **config)).eval()
    raise ValueError(f"unknown arch {arch!r}: use qwen2 or llama")


# ── Upstream pieces, driven in-process ──


class StopBeforeTraining(Exception):
    def __init__(self, parsed):
        super().__init__("arguments parsed and validated")
        self.parsed = parsed


def parse_train_args(argv: Sequence[str]):
    """Run ``openrlhf.cli.train_ppo_ray`` as ``__main__`` (real, patched parser and validation) up to ``train``."""
    import runpy

    import ray

    def stop(*_, **__):
        raise StopBeforeTraining(sys._getframe(1).f_locals["args"])  # train(args) asks Ray first

    saved_argv, saved_check = sys.argv, ray.is_initialized
    sys.argv, ray.is_initialized = ["train_ppo_ray", *argv], stop
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except StopBeforeTraining as parsed:
        return parsed.parsed
    finally:
        sys.argv, ray.is_initialized = saved_argv, saved_check
    raise RuntimeError("train_ppo_ray returned without calling train(args)")


class InProcessActorGroup:
    """Stands in for a ``RayActorGroup`` of GPU policy actors: same calls, run here, results as Ray refs."""

    def __init__(self, policy, ckpt_dir: str):
        self.policy, self.ckpt_dir, self.saved = policy, ckpt_dir, None

    def async_run_method_batch(self, method_name, **kwargs):
        import ray

        chunks = [dict(zip(kwargs, values)) for values in zip(*kwargs.values())]
        return [ray.put([getattr(self.policy, method_name)(**chunk) for chunk in chunks])]

    def async_run_method(self, method_name, *args, **kwargs):
        import ray

        return [ray.put(getattr(self, method_name)(*args, **kwargs))]

    def save_checkpoint(self, tag, client_states=None, metric_value=None, metric_key=None):
        os.makedirs(os.path.join(self.ckpt_dir, "_actor", tag), exist_ok=True)
        torch.save(client_states, os.path.join(self.ckpt_dir, "_actor", tag, "client_states.pt"))
        with open(os.path.join(self.ckpt_dir, "_actor", "latest"), "w") as fh:
            fh.write(tag)

    def get_checkpoint_states(self):
        with open(os.path.join(self.ckpt_dir, "_actor", "latest")) as fh:
            tag = fh.read()
        return torch.load(os.path.join(self.ckpt_dir, "_actor", tag, "client_states.pt"), weights_only=False)


def build(argv: Sequence[str], ckpt_dir: str, arch: str = "qwen2", num_layers: int = 4):
    """The patched upstream objects of one training run: args, policy actor, experience maker, trainer."""
    install_stand_ins()
    torch.cuda.current_device = lambda: "cpu"  # PolicyModelActor.forward asks CUDA for its device
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from openrlhf.utils.logging_utils import TensorboardLogger

    args = parse_train_args([*argv, "--ckpt.path", ckpt_dir])
    tokenizer = tiny_tokenizer()
    policy = PolicyModelActor.__ray_metadata__.modified_class.__new__(PolicyModelActor.__ray_metadata__.modified_class)
    policy.strategy = SimpleNamespace(args=args, ring_attn_group=None)
    policy.tokenizer = tokenizer
    policy.actor = Actor(tiny_model(tokenizer, arch, num_layers), temperature=args.rollout.temperature)
    policy.actor.packing_samples = args.ds.packing_samples
    group = InProcessActorGroup(policy, ckpt_dir)
    maker = RemoteExperienceMaker(group, None, None, None, FixedKLController(0.0), policy.strategy, tokenizer)
    trainer = BasePPOTrainer.__new__(BasePPOTrainer)
    trainer.args, trainer.experience_maker = args, maker
    trainer.actor_model_group, trainer.critic_model_group = group, None
    trainer.wandb_logger = None
    trainer.tensorboard_logger = TensorboardLogger(args) if args.logger.tensorboard_dir else None
    trainer.best_eval_metric_key, trainer.best_eval_metric_value, trainer._latest_eval_metric_value = None, -1e9, None
    return SimpleNamespace(args=args, tokenizer=tokenizer, policy=policy, maker=maker, trainer=trainer, group=group)


@torch.no_grad()
def generate_rollouts(run, questions: List[tuple], generator: torch.Generator) -> list:
    """n rollouts per question from ``generate``: free reasoning tokens, then ``\\boxed{`` and a sampled digit.

    The answer format is forced because a random model never writes ``\\boxed{`` by itself; the digit is
    still the model's own choice, so its wrong answers recur the way a collapsing policy's do.
    """
    from openrlhf.trainer.ppo_utils.experience import Experience

    tok, model, n = run.tokenizer, run.policy.actor.model, run.args.rollout.n_samples_per_prompt
    digits = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    anchor = tok.encode("\\boxed{", add_special_tokens=False)
    closing = tok.encode("}.", add_special_tokens=False) + [tok.eos_token_id]
    samples = []
    for a, b in questions:
        prompt = f"Question: what is {a} + {b}? Please put your final answer within \\boxed{{}}. Answer:"
        prompt_ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        reasoning = model.generate(
            prompt_ids.repeat(n, 1), do_sample=True, max_new_tokens=6, min_new_tokens=6,
            pad_token_id=tok.pad_token_id, attention_mask=torch.ones(n, prompt_ids.shape[1], dtype=torch.long),
        )  # fmt: skip
        with_anchor = torch.cat([reasoning, torch.tensor([anchor] * n)], dim=1)
        logits = model(input_ids=with_anchor).logits[:, -1, digits]
        answer = digits[torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)]
        for row in range(n):
            ids = with_anchor[row].tolist() + [int(answer[row])] + closing
            text = tok.decode(ids[prompt_ids.shape[1] :])
            found = ANSWER_RE.findall(text)
            score = float(bool(found) and found[-1] == str(a + b))
            length = len(ids)
            action_mask = torch.zeros(length - 1, dtype=torch.bool)
            action_mask[prompt_ids.shape[1] - 1 :] = True
            samples.append(
                Experience(
                    sequences=torch.tensor([ids]), attention_mask=torch.ones(1, length, dtype=torch.long),
                    action_mask=action_mask.unsqueeze(0), prompts=[prompt], labels=[str(a + b)],
                    rewards=torch.tensor([score]), scores=torch.tensor([score]),
                    response_length=torch.tensor([length - prompt_ids.shape[1]]), truncated=torch.tensor([False]),
                    total_length=torch.tensor([float(length)]),
                    info={"reward": torch.tensor([score]), "score": torch.tensor([score])},
                )  # fmt: skip
            )
    return samples


def train_steps(run, steps: int, start_step: int = 1, seed: int = 0) -> list:
    """Run ``steps`` steps: rollouts, the real experience making with MEDS, logging and checkpoints."""
    from meds_patch import openrlhf_glue as meds

    questions = [(a, b) for a in range(5) for b in range(5) if a + b < 10][: run.args.rollout.batch_size]
    history = []
    for step in range(start_step, start_step + steps):
        # Seeded per step, so a resumed run replays exactly the rollouts an uninterrupted run would see.
        samples = generate_rollouts(run, questions, torch.Generator().manual_seed(seed * 100_003 + step))
        experiences = run.maker.make_experience_batch(samples)
        status = meds.step_metrics(run.maker)
        status["reward_mean"] = float(torch.cat([e.rewards for e in experiences]).mean())
        run.trainer.save_logs_and_checkpoints(step, status, {"global_step": step})
        history.append((status, experiences))
    return history


def run_demo(steps: int = 4, save: Optional[str] = None, resume: Optional[str] = None) -> int:
    import ray

    start = time.time()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ckpt_dir = resume or save or tempfile.mkdtemp(prefix="meds-demo-")
    argv = ["--meds", "--algo.meds.num_layers", "4", "--reward.remote_url", "demo-rule-reward",
            "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "8",
            "--rollout.batch_size", "8", "--rollout.micro_batch_size", "16", "--ckpt.save_steps", "1",
            "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1"]  # fmt: skip
    if resume:
        argv.append("--ckpt.load_enable")
    run = build(argv, ckpt_dir)
    first = 1
    if resume:
        states = run.trainer.init_checkpoint_states()
        run.trainer.restore_best_checkpoint_state(states)
        first = states["global_step"] + 1
        print(f"resumed from {ckpt_dir} at step {first - 1}: {run.maker.meds_memory.summary()}")
    for (status, _), step in zip(train_steps(run, steps, start_step=first), range(first, first + steps)):
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in status.items())
        print(f"step {step}: {shown}")
    print(f"checkpoints in {ckpt_dir}; {time.time() - start:.1f} s")
    ray.shutdown()
    return 0
