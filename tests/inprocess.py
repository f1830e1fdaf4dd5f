"""The patched upstream path driven in one process, for unit tests: the real parser and validation,
``PolicyModelActor.forward``, ``make_experience``, ``compute_advantages_and_returns`` and the trainer's checkpoint
save/restore, with the policy actor in-process and rollouts from Hugging Face ``generate`` on a tiny model.

The end-to-end tests (``test_e2e.py``) run the same code through upstream's real entry point instead.
"""

import os
import re
import sys
from types import SimpleNamespace
from typing import List, Sequence

import torch

from meds_patch.cpu.tiny_math import tiny_model, tiny_tokenizer

ANSWER_RE = re.compile(r"\\boxed\{([^{}]*)\}")


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
    from meds_patch.integration import glue as meds

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
