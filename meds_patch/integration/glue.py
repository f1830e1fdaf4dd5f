"""What the patch series' inserted lines call: MEDS inside OpenRLHF 0.11.2.

Flag to reward: ``add_arguments`` defines ``--meds`` and ``--algo.meds.*`` (``MEDSConfig`` and ``TrainerOptions``);
``validate_arguments`` checks them; ``start_capture``/``finish_capture`` read the (B, K) features in the policy's
experience forward on each actor rank; ``attach_features`` hangs them on the controller's ``Experience``s;
``record_outcomes`` reads correctness before upstream's length penalties and ``shape_rewards`` runs the error
memory right after them, subtracting the penalties; ``step_metrics``, ``memory_state`` and ``restore_memory`` log
and checkpoint it. What MEDS keeps is in the three dataclasses below. Every entry point is a no-op without --meds.
"""

import argparse
import logging
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import torch

from meds_patch.core import CHECKPOINT_KEY
from meds_patch.core.config import FEATURES, TARGETS, MEDSConfig, option
from meds_patch.core.features import ANCHOR_SEARCHES, AnswerHiddenStates, find_answer_positions

if TYPE_CHECKING:  # the memory's module imports hdbscan: only the controller needs it, and only when used
    from meds_patch.core.memory import StepStats

logger = logging.getLogger(__name__)

DEFAULT_ANCHOR = "\\boxed{"
GROUP_ESTIMATORS = ("group_norm", "dr_grpo", "rloo", "reinforce_baseline")
PROMPT_SNIPPET = 300  # characters of each question kept for reports


@dataclass
class TrainerOptions:
    """The integration's own ``--algo.meds.*`` flags, beside ``MEDSConfig``'s (which the core reads)."""

    num_workers: int = option(
        0, "spread the error memory over this many Ray CPU actors by question; 0 keeps it in the controller"
    )
    anchor: str = option(DEFAULT_ANCHOR, "text whose last occurrence in the response marks the answer")
    anchor_search: str = option(
        "tokens",
        "tokens: the anchor's token ids, then a 'boxed' token and a '{' after it (the authors' search); "
        "text: the last anchor in the decoded response, which a box written mid-sentence cannot escape "
        "(about 1 ms more per 4k-token response)",
    )


FLAGS = fields(MEDSConfig) + fields(TrainerOptions)
FLAG_CHOICES = {"target": TARGETS, "anchor_search": ANCHOR_SEARCHES, "feature": FEATURES}


# ── What MEDS keeps, and where ──


@dataclass
class ForwardCapture:
    """One experience forward's capture on an actor rank, held as ``policy.meds_capture`` while the forward runs."""

    hidden: Optional[AnswerHiddenStates]  # the hooks and what they kept; None with --algo.meds.feature answer
    target: Optional[torch.Tensor] = None  # (B,) each row's answer token, the one whose logit is read
    valid: Optional[torch.Tensor] = None  # (B,) rows with an answer position
    ring_group: Any = None  # packed ring attention: each answer position lives on one rank of this group
    failure: Optional[str] = None  # why this rank has no features: the controller raises it


@dataclass
class RolloutValues:
    """What MEDS carries on each controller ``Experience`` (as ``exp.meds``) from the forward to the shaping, which
    removes it. Not in ``info``: upstream's replay buffer merges and splits ``info``."""

    features: Optional[torch.Tensor] = None  # (B, K) float32, NaN rows without an answer position
    correct: Optional[np.ndarray] = None  # (B,) bool, read before upstream's length penalties


@dataclass
class ControllerState:
    """What MEDS keeps on the controller, as ``maker.meds_state``: the error memory, each question's wrong answers
    and text (checkpointed with the memory) and what the last step measured (for the logs)."""

    memory: Any  # ErrorMemory, ShardedErrorMemory (--algo.meds.num_workers > 0) or AnswerMemory (--feature answer)
    # Each question's earlier wrong answers, counted whatever the memory keeps: what its clusters are checked against.
    wrong_answers: Any = None  # AnswerMemory with target "wrong"
    prompts: Dict[str, str] = field(default_factory=dict)  # prompt key -> the question's first characters
    last_step: Optional["StepStats"] = None
    # core.metrics.wrong_answer_diversity and top1_eigen_ratio: how varied the step's answers and features are
    diversity: Dict[str, float] = field(default_factory=dict)
    agreement: Dict[str, float] = field(default_factory=dict)  # core.metrics.cluster_answer_agreement
    seconds: float = 0.0  # the controller's time in the last shaping


def enabled(args) -> bool:
    """True when ``--meds`` is on; False for args built without the MEDS flags (e.g. by upstream's tests)."""
    return bool(getattr(getattr(getattr(args, "algo", None), "meds", None), "enable", False))


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--meds`` and ``--algo.meds.<field>`` for every field of ``MEDSConfig`` and ``TrainerOptions``."""
    group = parser.add_argument_group("MEDS (memory-enhanced dynamic reward shaping, arXiv:2604.11297)")
    # dest algo.meds.enable: a bare "meds" dest would collide with the algo.meds namespace in hierarchize.
    group.add_argument("--meds", dest="algo.meds.enable", action="store_true", default=False, help="enable MEDS")
    for flag in FLAGS:
        kind = {"noise_as_cluster": _bool, "beta": float, "max_per_memory": int}.get(flag.name, type(flag.default))
        choices = FLAG_CHOICES.get(flag.name)
        group.add_argument(
            f"--algo.meds.{flag.name}",
            type=kind,
            default=flag.default,
            help=f"{flag.metadata['help']} (default: {flag.default})",
            **({"choices": choices} if choices else {"metavar": kind.__name__.strip("_").upper()}),
        )

    # The baseline of the paper's comparison that OpenRLHF lacks; off by default, independent of --meds.
    group = parser.add_argument_group("Entropy advantage (Cheng et al., arXiv:2506.14758; a baseline of the paper)")
    group.add_argument(
        "--algo.entropy_advantage.enable",
        action="store_true",
        default=False,
        help="shape each token's advantage in the policy update: A_t + min(alpha * H_t, |A_t| / kappa), H_t detached",
    )
    group.add_argument("--algo.entropy_advantage.alpha", type=float, default=0.4, help="entropy scale (default: 0.4)")
    group.add_argument(
        "--algo.entropy_advantage.kappa",
        type=float,
        default=2.0,
        help="the bonus is at most |A_t| / kappa (default: 2)",
    )


def meds_config(args) -> MEDSConfig:
    meds = vars(args.algo.meds)
    return MEDSConfig(**{f.name: meds[f.name] for f in fields(MEDSConfig)})


def validate_arguments(args) -> None:
    """Fail before any Ray actor starts when the MEDS or entropy-advantage flags cannot work with the rest."""
    if entropy_advantage_enabled(args):
        options = args.algo.entropy_advantage
        if not (math.isfinite(options.alpha) and options.alpha >= 0):
            raise ValueError(
                f"--algo.entropy_advantage.alpha={options.alpha} is invalid: must be a finite number >= 0"
            )
        if not (math.isfinite(options.kappa) and options.kappa > 0):
            raise ValueError(f"--algo.entropy_advantage.kappa={options.kappa} is invalid: must be a finite number > 0")
        # Upstream's actor computes the entropy only for an entropy loss (return_entropy: entropy_coef is not
        # None). Coefficient 0 computes and logs it and leaves the loss alone.
        if args.actor.entropy_coef is None:
            args.actor.entropy_coef = 0.0
    if not enabled(args):
        changed = [f"--algo.meds.{f.name}" for f in FLAGS if getattr(args.algo.meds, f.name) != f.default]
        if changed:
            raise ValueError(f"{', '.join(changed)} given without --meds: add --meds to enable MEDS")
        return
    try:
        meds_config(args)
    except ValueError as err:
        raise ValueError(str(err).replace("MEDSConfig.", "--algo.meds.")) from None
    if not args.algo.meds.anchor:
        raise ValueError("--algo.meds.anchor must be a non-empty string")
    if args.algo.meds.num_workers < 0:
        raise ValueError(f"--algo.meds.num_workers={args.algo.meds.num_workers} is invalid: must be >= 0")
    if args.algo.meds.feature == "answer" and args.algo.meds.num_workers > 0:
        raise ValueError(
            "--algo.meds.feature answer keeps a count per answer in the controller: --algo.meds.num_workers must be 0"
        )
    if args.algo.advantage.estimator in GROUP_ESTIMATORS and args.rollout.n_samples_per_prompt < 2:
        raise ValueError(
            f"--meds with --algo.advantage.estimator {args.algo.advantage.estimator} needs "
            "--rollout.n_samples_per_prompt > 1"
        )
    if not (args.reward.remote_url or args.train.agent_func_path or args.reward.model_name_or_path):
        raise ValueError(
            "--meds needs a correctness source: --reward.remote_url, --train.agent_func_path or a reward model"
        )
    if not (args.reward.remote_url or args.train.agent_func_path):
        logger.warning(
            "MEDS with a reward model: a rollout counts as correct when its reward >= --algo.meds.correct_threshold "
            f"({args.algo.meds.correct_threshold}); make sure that threshold means something for this model"
        )
    if args.ckpt.disable_ds:
        logger.warning("MEDS: --ckpt.disable_ds saves no checkpoint state, so the error memory is lost on restart")
    # Upstream rewrites some flags after parsing (packing forces flash-attention 2, ring attention forces packing,
    # vLLM sleep needs colocation): one line of what this run really uses where the features are read.
    resolved = {
        "ds.packing_samples": args.ds.packing_samples, "ds.attn_implementation": args.ds.attn_implementation,
        "ds.ring_attn_size": args.ds.ring_attn_size, "ds.zero_stage": args.ds.zero_stage,
        "train.colocate_all": args.train.colocate_all, "vllm.enable_sleep": args.vllm.enable_sleep,
        "ds.enable_sleep": args.ds.enable_sleep, "vllm.sync_backend": args.vllm.sync_backend,
        "actor.gradient_checkpointing_enable": args.actor.gradient_checkpointing_enable,
        "algo.meds.num_layers": args.algo.meds.num_layers,
    }  # fmt: skip
    print("MEDS: settings as upstream resolved them: " + " ".join(f"{k}={v}" for k, v in resolved.items()), flush=True)


HOOK_MISSING = (
    "is not active in the Python environment Ray uses there: install openrlhf-meds on every node (after an "
    "editable install, run `python -m meds_patch install-hook`)"
)
nodes_checked = False  # whether this process has checked every node for the import hook
HOOK_PROBE_TIMEOUT = 300  # seconds for every node to answer whether it has the hook


def require_hook_on_every_node() -> None:
    """Raise, naming them, when nodes of the Ray cluster lack the import hook (once per process; no-op outside Ray).

    Called by every MEDS process on its first step: a node without the hook runs upstream's code unchanged, so a
    controller placed there would ignore MEDS, and a policy rank there would return log-probs without features.
    """
    global nodes_checked
    import ray

    if nodes_checked or not ray.is_initialized():
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def hook_active() -> bool:  # defined here so Ray ships it by value: a node may lack meds_patch altogether
        import sys

        return any(type(f).__module__ == "meds_patch.integration.hook" for f in sys.meta_path)

    probe = ray.remote(num_cpus=0)(hook_active)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            for node in nodes]  # fmt: skip
    # One wait over all nodes: a node that does not answer within it counts as one without the hook.
    answered, _ = ray.wait(refs, num_returns=len(refs), timeout=HOOK_PROBE_TIMEOUT)
    missing = []
    for node, ref in zip(nodes, refs):
        try:
            active = ref in answered and ray.get(ref)
        except ray.exceptions.RayError:
            active = False
        if not active:
            missing.append(node["NodeManagerAddress"])
    if missing:
        raise RuntimeError(f"MEDS: the meds_patch import hook on node(s) {', '.join(missing)} {HOOK_MISSING}")
    nodes_checked = True


# ── Actor ranks: features from the experience forward ──


def start_capture(policy, sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor):
    """Hook the last K blocks of ``policy.actor`` to keep hidden states only at each row's answer position.

    Works for padded and packed (``--ds.packing_samples``) layouts; with ring attention each rank keeps the
    positions of its own slice. Returns the capture for ``finish_capture``, or None when MEDS is off.
    """
    args = policy.strategy.args
    if not enabled(args):
        return None
    require_hook_on_every_node()
    if args.algo.meds.feature == "answer":  # the memory keeps answers: nothing to read from the layers
        return ForwardCapture(hidden=None)
    stale = getattr(policy, "meds_capture", None)
    if stale is not None and stale.hidden is not None:  # left behind by a forward that raised
        stale.hidden.__exit__(None, None, None)
    ring_group = policy.strategy.ring_attn_group if args.ds.packing_samples else None
    try:
        batch, length = sequences.shape
        # action_mask covers the last A - 1 transitions: token j of the response window is
        # sequences[:, length - A + j]. A row without action tokens has no response to search (its prompt may well
        # ask for a \boxed{}).
        response_start = torch.where(
            action_mask.any(1), action_mask.long().argmax(1) + length - action_mask.shape[1], length
        )
        positions = find_answer_positions(
            sequences,
            response_start,
            policy.tokenizer,
            args.algo.meds.anchor,
            attention_mask=attention_mask,
            search=args.algo.meds.anchor_search,
        )
        rows = torch.arange(batch)
        valid = positions >= 0
        target = sequences.cpu()[rows, (positions + 1).clamp(max=length - 1)]
        if args.ds.packing_samples:
            # Packing keeps the attended tokens only, row after row: the packed index is a running count of the
            # mask.
            packed = attention_mask.cpu().flatten().long().cumsum(0) - 1
            flat = torch.where(valid, packed[rows * length + positions.clamp(min=0)], -1)
            num_tokens = int(attention_mask.sum())
            if ring_group is not None:
                ring_size = torch.distributed.get_world_size(ring_group)
                num_tokens = math.ceil(num_tokens / ring_size)  # upstream pads the packed sequence to split it
                start = torch.distributed.get_rank(ring_group) * num_tokens
                flat = torch.where(valid & (flat >= start) & (flat < start + num_tokens), flat - start, -1)
        else:
            flat = torch.where(valid, rows * length + positions, -1)
            num_tokens = batch * length
        hidden = AnswerHiddenStates(policy.actor.model, flat, num_tokens, args.algo.meds.num_layers)
        policy.meds_capture = ForwardCapture(hidden.__enter__(), target, valid, ring_group)
    except Exception as error:
        # Raised here, it would stop this rank while the others go on into the forward's collectives: the forward
        # runs without hooks instead, and finish_capture hands the failure to the controller.
        no_rows = torch.full((len(sequences),), -1)
        hidden = AnswerHiddenStates(policy.actor.model, no_rows, -1, args.algo.meds.num_layers)
        policy.meds_capture = ForwardCapture(
            hidden, no_rows, no_rows >= 0, ring_group, failure=f"{type(error).__name__}: {error}"
        )
    return policy.meds_capture


@torch.no_grad()
def finish_capture(policy, capture: ForwardCapture):
    """Remove the hooks and return the (B, K) float32 features on CPU (NaN rows: no answer position); None when
    the memory keeps answers; a message (str) when the capture failed on this rank, which the controller raises."""
    if capture.hidden is None:
        return None
    policy.meds_capture = None
    hidden = capture.hidden
    hidden.__exit__(None, None, None)
    if capture.failure is None and any(state is None for state in hidden.states):
        capture.failure = f"no forward of {hidden.num_tokens} tokens reached the hooked blocks"
    if capture.failure is not None:
        # This rank still runs the norm, the LM head and the ring all-reduce below, on zeros: the other ranks meet it
        # in those collectives (ZeRO-3 gathers the parameters, ring attention sums the features), and a rank that
        # stopped here would leave them waiting for good. The controller raises the failure for the whole step.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        capture.failure = f"MEDS: the feature capture failed on policy rank {rank}: {capture.failure}"
        logger.error(capture.failure)
        head = hidden.lm_head.weight  # (V, H); ZeRO-3 keeps the full shape as ds_shape
        width = getattr(head, "ds_shape", head.shape)[-1]
        placeholder = torch.zeros(len(hidden.flat_index), width, dtype=head.dtype, device=head.device)
        hidden.states = [placeholder] * len(hidden.blocks)
    values = hidden.logits(capture.target)
    if capture.ring_group is not None:
        # Each position lives on exactly one ring rank: sum the ranks' shares so every duplicate rank agrees. A last
        # column counts the ranks whose capture failed, so that every rank of the ring reports it (the controller
        # may read any one of them).
        mine = (hidden.flat_index >= 0).to(values.device).unsqueeze(1)
        values = torch.where(mine, values, torch.zeros_like(values))
        failed = torch.full_like(values[:, :1], float(capture.failure is not None))
        values = torch.cat([values, failed], dim=1)
        torch.distributed.all_reduce(values, group=capture.ring_group)
        values, failed = values[:, :-1], values[0, -1]
        if capture.failure is None and failed > 0:
            capture.failure = (
                f"MEDS: the feature capture failed on {int(failed)} ring-attention peer(s) of policy rank "
                f"{torch.distributed.get_rank()} (the failing rank's log gives the reason)"
            )
        values = torch.where(capture.valid.to(values.device).unsqueeze(1), values, float("nan"))
    return capture.failure or values.cpu()


def entropy_advantage_enabled(args) -> bool:
    """True with ``--algo.entropy_advantage.enable``; False for args built without it (e.g. by upstream's tests)."""
    return bool(getattr(getattr(getattr(args, "algo", None), "entropy_advantage", None), "enable", False))


def entropy_shaped_advantages(args, experience, advantages: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """In the policy update, on each actor rank: the advantages with the entropy bonus (``core.entropy_advantage``);
    the bonus's mean over the action tokens is logged as ``train/entropy_advantage_bonus``."""
    from meds_patch.core.entropy_advantage import entropy_advantage

    options = args.algo.entropy_advantage
    entropy = entropy[:, -advantages.shape[1] :]  # the forward's entropy covers the prompt too, as upstream slices it
    shaped = entropy_advantage(advantages, entropy, options.alpha, options.kappa)
    mask = experience.action_mask.to(shaped.dtype)
    experience.info["entropy_advantage_bonus"] = (
        ((shaped - advantages) * mask).sum() / mask.sum().clamp(min=1)
    ).detach()
    return shaped


# ── Controller: memory, penalties, metrics, checkpoints ──


def attach_features(samples_list: List, results: List) -> List[torch.Tensor]:
    """Split the actor's (log-probs, features) results; the features ride on each Experience (not in info)."""
    require_hook_on_every_node()
    log_probs = []
    for samples, result in zip(samples_list, results):
        if not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(
                f"MEDS: an actor rank returned log-probs without features: the meds_patch import hook on its node "
                f"{HOOK_MISSING}"
            )
        if isinstance(result[1], str):  # finish_capture's message: that rank's capture failed
            raise RuntimeError(result[1])
        samples.meds = RolloutValues(features=result[1])
        log_probs.append(result[0])
    return log_probs


def controller_state(maker) -> ControllerState:
    """The experience maker's MEDS state (created on first use), so sync and async trainers share the path."""
    if getattr(maker, "meds_state", None) is None:
        from meds_patch.core.memory import AnswerMemory, ErrorMemory

        config = meds_config(maker.args)
        workers = maker.args.algo.meds.num_workers
        if config.feature == "answer":
            memory = AnswerMemory(config)
        elif workers > 0:
            from meds_patch.integration.sharded import ShardedErrorMemory

            memory = ShardedErrorMemory(config, workers)
        else:
            memory = ErrorMemory(config)
        maker.meds_state = ControllerState(memory, AnswerMemory(replace(config, target="wrong")))
    return maker.meds_state


def record_outcomes(maker, experiences: List) -> None:
    """Before upstream's length penalties: whether each rollout is correct, from its ``scores`` (the dynamic-filter
    signal, left untouched), else from its rewards (a reward model's judgement). ALGORITHM.md §2: correctness is the
    reward before shaping, so a correct but overlong answer must not count as a wrong one."""
    threshold = maker.args.algo.meds.correct_threshold
    for exp in experiences:
        source = exp.scores if exp.scores is not None else exp.rewards
        if getattr(exp, "meds", None) is None:  # a forward that brought no features (e.g. a hand-made Experience)
            exp.meds = RolloutValues()
        exp.meds.correct = source.float().reshape(-1).cpu().numpy() >= threshold


def shape_rewards(maker, experiences: List) -> None:
    """Apply MEDS to every rollout of the step: after length penalties, before any baseline or normalisation.

    Correctness is what ``record_outcomes`` read before the length penalties. Records per-sample
    ``info["meds_penalty"]`` and the step's statistics.
    """
    from meds_patch.core.memory import prompt_key
    from meds_patch.core.metrics import cluster_answer_agreement, top1_eigen_ratio, wrong_answer_diversity
    from meds_patch.core.penalty import apply_penalties

    start = time.perf_counter()
    state, config = controller_state(maker), meds_config(maker.args)
    keys, outcomes, features, answers = [], [], [], []
    for exp in experiences:
        keys += [prompt_key(p) for p in exp.prompts]
        state.prompts.update(zip(keys[-len(exp.prompts) :], (p[:PROMPT_SNIPPET] for p in exp.prompts)))
        answers += final_answers(maker.tokenizer, exp)
        outcomes.append(exp.meds.correct)
        features.append(None if exp.meds.features is None else exp.meds.features.float().numpy())
    if not keys:
        return
    # A model with fewer than K blocks gives fewer columns; rows that came back without features are all-NaN.
    width = next((f.shape[1] for f in features if f is not None), config.num_layers)
    features = [np.full((len(o), width), np.nan, np.float32) if f is None else f for f, o in zip(features, outcomes)]
    correct = np.concatenate(outcomes)
    penalties = state.memory.update(keys, correct, answers if config.feature == "answer" else np.concatenate(features))
    state.wrong_answers.update(keys, correct, answers)

    offset = 0
    for exp in experiences:
        n = len(exp.rewards)
        p, ok = penalties[offset : offset + n], correct[offset : offset + n]
        exp.rewards = apply_penalties(exp.rewards, ok, p)
        if "reward" in exp.info:  # as upstream's length penalties do, so logged rewards show the shaping
            exp.info["reward"] = exp.rewards.clone()
        exp.info["meds_penalty"] = torch.from_numpy(p.astype(np.float32))
        del exp.meds
        offset += n
    state.last_step = state.memory.last_step
    state.diversity = {
        **wrong_answer_diversity(keys, correct, answers),
        **top1_eigen_ratio(keys, np.concatenate(features)),
    }
    state.agreement = cluster_answer_agreement(correct, state.memory.last_votes, state.wrong_answers.last_votes.sizes)
    state.seconds = time.perf_counter() - start


def final_answers(tokenizer, exp) -> List[Optional[str]]:
    """The last ``\\boxed{}`` answer of each response, from its last tokens only: decoding whole responses of a
    paper-scale step would cost the controller seconds. A box that starts earlier gets a longer second look."""
    from meds_patch.core.answers import last_boxed_answer

    answers = []
    for sequence, mask in zip(exp.sequences, exp.attention_mask):
        end = int(mask.sum())
        text = tokenizer.decode(sequence[max(0, end - 48) : end], skip_special_tokens=True)
        answer = last_boxed_answer(text)
        if answer is None and "boxed" not in text:
            text = tokenizer.decode(sequence[max(0, end - 1024) : end], skip_special_tokens=True)
            answer = last_boxed_answer(text)
        answers.append(answer)
    return answers


def step_metrics(maker) -> Dict[str, float]:
    """The step's MEDS statistics for the trainer's logs (logged as ``train/meds/*``)."""
    state = controller_state(maker)
    step = state.last_step
    if step is None:
        return {}
    summary = state.memory.summary()
    return {
        "meds/memories": summary["memories"],
        "meds/stored_vectors": summary["vectors"],
        "meds/clusters": summary["clusters"],
        "meds/penalised_wrong_share": step.penalised_wrong / max(step.wrong, 1),
        "meds/without_feature_share": step.without_feature / max(step.rows, 1),
        "meds/non_finite_features": step.non_finite,
        "meds/penalty_mean": step.mean_penalty,
        "meds/penalty_max": step.max_penalty,
        **{f"meds/{name}": value for name, value in state.diversity.items()},
        **{f"meds/{name}": value for name, value in state.agreement.items()},
        "meds/controller_seconds": state.seconds,
    }


def eval_metrics(args, samples_list: List, n_samples_per_prompt: int) -> Dict[str, float]:
    """Unbiased pass@k (k = 1, 2, 4, ..., n) over the evaluation prompts, beside upstream's pass@1 and pass@n."""
    from meds_patch.core.metrics import pass_at_k

    rewards = [float(r) for s in samples_list for r in s.rewards.reshape(-1)]
    n = n_samples_per_prompt
    if not rewards or len(rewards) % n:
        return {}
    groups = np.asarray(rewards).reshape(-1, n) >= args.algo.meds.correct_threshold
    ks = [2**i for i in range(int(math.log2(n)) + 1)] + ([n] if n & (n - 1) else [])
    return {f"eval_unbiased_pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in groups.sum(1)])) for k in ks}


class MemoryCheckpoint(dict):
    """The memory's state in checkpoint ``client_states``; a short repr because upstream logs those states."""

    def __repr__(self) -> str:
        return f"<MEDS error memory: {len(self.get('keys', []))} memories>"


def memory_state(maker) -> MemoryCheckpoint:
    state = controller_state(maker)
    saved = state.memory.state_dict()
    prompts = {k: state.prompts[k] for k in set(saved["keys"]) if k in state.prompts}
    return MemoryCheckpoint(saved, prompts=prompts, wrong_answers=state.wrong_answers.state_dict())


def restore_memory(maker, checkpoint_states: Dict[str, Any]) -> None:
    """At the trainer's start: create the memory (so sharded memories start their actors now, not inside the first
    step) and load the one saved with the checkpoint, if any (a checkpoint from before MEDS simply has none)."""
    state = controller_state(maker)
    saved: Optional[dict] = checkpoint_states.get(CHECKPOINT_KEY)
    if saved is None:
        if checkpoint_states.get("global_step", 0) > 0:
            logger.warning("MEDS: the checkpoint has no error memory; starting with an empty one")
        return
    state.memory.load_state_dict(dict(saved))
    if "wrong_answers" in saved:  # checkpoints from before the cluster-answer diagnostic have none
        state.wrong_answers.load_state_dict(saved["wrong_answers"])
    state.prompts = dict(saved.get("prompts", {}))
    # print, not logger.info: upstream leaves this module's logger at WARNING, and users must see the restore.
    print(f"MEDS: restored {state.memory.summary()} from the checkpoint", flush=True)
