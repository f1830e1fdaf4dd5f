"""The GPU recipe as written, on this machine: ``python -m meds_patch demo --recipe`` runs
``examples/scripts/train_meds_qwen2.5_math_7b.sh`` itself against a local Ray cluster with two declared GPUs: packing
with flash-attention 2 (the CPU backend's kernels), ZeRO-3 over two policy ranks, colocation, DeepSpeed's and vLLM's
sleep, gradient checkpointing, the arm's options, evaluation, save_hf and K = 14 on a 14-block model. Two runs serve
the tests that read them, DAPO and GRPO with ring attention; the test-only switches of ``tests/feature_dump`` are on
in their clusters."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from meds_patch.core.features import find_answer_positions
from meds_patch.cpu.cluster import scalars
from meds_patch.cpu.demo import RECIPE_QUESTIONS
from meds_patch.cpu.tiny_math import recipe_model
from meds_patch.tools.report import find_memory_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "examples/scripts/train_meds_qwen2.5_math_7b.sh"
FEATURE_DUMP = os.path.join(ROOT, "tests", "feature_dump")
NUM_LAYERS = 14  # the recipe's --algo.meds.num_layers, and every block of the recipe model
SAMPLES = 8  # demo.RECIPE_CPU_ARGS' --rollout.n_samples_per_prompt


def run_recipe(folder: str, steps: int, *extra: str, timeout: float = 1200, **env) -> SimpleNamespace:
    """``python -m meds_patch demo --recipe RECIPE --save folder --steps steps -- extra`` with ``env`` added."""
    env = {**os.environ, "MEDS_TEST_FEATURE_DUMP": "1", "PYTHONPATH": FEATURE_DUMP, **env}
    command = [sys.executable, "-m", "meds_patch", "demo", "--recipe", RECIPE, "--save", folder, "--steps", str(steps),
               "--", *extra]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert os.path.isfile(os.path.join(folder, "job.log")), proc.stdout[-3000:] + proc.stderr[-3000:]  # submitted
    log = open(os.path.join(folder, "job.log"), errors="replace").read()
    return SimpleNamespace(proc=proc, folder=folder, log=log, steps=scalars(os.path.join(folder, "tensorboard")))


@pytest.fixture(scope="module")
def dapo(tmp_path_factory):
    return run_recipe(str(tmp_path_factory.mktemp("dapo")), 2, ALGO="dapo")


@pytest.fixture(scope="module")
def grpo_ring(tmp_path_factory):
    # GRPO (reference model, KL loss) with the two policy ranks forming one ring: each holds half of every packed
    # micro-batch. Micro-batches of 3 rows: of equal lengths (a question's samples often are), the middle one lies on
    # both ranks. One run serves the GRPO arm and ring attention.
    extra = ["--ds.ring_attn_size", "2", "--rollout.micro_batch_size", "3"]
    return run_recipe(str(tmp_path_factory.mktemp("grpo_ring")), 2, *extra, ALGO="grpo")


RESOLVED = (
    "MEDS: settings as upstream resolved them: ds.packing_samples=True ds.attn_implementation=flash_attention_2 "
    "ds.ring_attn_size={ring} ds.zero_stage=3 train.colocate_all=True vllm.enable_sleep=True ds.enable_sleep=True "
    "vllm.sync_backend=gloo actor.gradient_checkpointing_enable=True algo.meds.num_layers=14"
)
ARMS = ["dapo", "grpo_ring"]


@pytest.mark.parametrize("arm", ARMS)
def test_the_recipe_runs_with_packing_flash_attention_zero3_colocation_and_both_sleeps(arm, request):
    run = request.getfixturevalue(arm)
    assert run.proc.returncode == 0, run.proc.stdout[-3000:] + run.proc.stderr[-3000:]
    assert RESOLVED.format(ring=2 if arm == "grpo_ring" else 1) in run.proc.stdout
    assert "seconds to fall asleep" in run.log  # vLLM's engines were put to sleep between phases
    assert sorted(run.steps) == [1, 2]


@pytest.mark.parametrize("arm", ARMS)
def test_the_recipe_penalises_recurring_wrong_answers_at_step_2(arm, request):
    steps = request.getfixturevalue(arm).steps
    assert steps[1]["train/meds/penalty_max"] == 0.0  # nothing remembered yet
    assert steps[2]["train/meds/penalty_max"] > 0


@pytest.mark.parametrize("arm", ARMS)
def test_the_checkpointed_memory_holds_14_wide_features(arm, request):
    run = request.getfixturevalue(arm)
    state, _ = find_memory_state(os.path.join(run.folder, "ckpt"))
    vectors = [torch.as_tensor(v) for v in state["vectors"] if len(v)]
    assert vectors and all(v.shape[1] == NUM_LAYERS for v in vectors)


def test_dapo_filters_groups_evaluates_and_saves_the_hf_model(dapo):
    assert "train/dynamic_filtering_pass_rate" in dapo.steps[1]
    assert any(key.startswith("eval/") for key in dapo.steps[2])  # --eval.steps 2
    assert os.path.isfile(os.path.join(dapo.folder, "ckpt", "global_step2_hf", "config.json"))  # --ckpt.save_hf


def test_grpo_trains_against_its_reference_model_with_a_kl_loss(grpo_ring):
    assert "  ReferenceModelActor: " in grpo_ring.proc.stdout  # the demo lists the run's actors after step 1
    steps = grpo_ring.steps
    assert math.isfinite(steps[2]["train/kl"]) and "train/dynamic_filtering_pass_rate" not in steps[1]


def answer_positions(tokenizer, row) -> torch.Tensor:
    """Each row's answer position in its padded row, found as the actor finds it (-1: none)."""
    sequences, action_mask = row["sequences"], row["action_mask"]
    response_start = action_mask.long().argmax(1) + sequences.shape[1] - action_mask.shape[1]
    return find_answer_positions(sequences, response_start, tokenizer, attention_mask=row["attention_mask"])


def own_features(model, tokenizer, sequences, attention_mask, action_mask) -> torch.Tensor:
    """(B, K) layer logits at each row's answer token, recomputed from the row's own tokens alone (no padding, no
    packing) through the model's ``output_hidden_states``: the last K hidden states (the last one normed, as the
    model returns it) read through the LM head at the answer position, for the token after it."""
    batch = len(sequences)
    positions = answer_positions(
        tokenizer, dict(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask)
    )
    features = torch.full((batch, NUM_LAYERS), math.nan)
    for row in range(batch):
        if positions[row] < 0:
            continue
        kept = attention_mask[row].bool()
        tokens = sequences[row][kept].unsqueeze(0)
        at = int(kept[: positions[row]].sum())  # the answer position among the row's own tokens
        with torch.no_grad():
            hidden = model(tokens, output_hidden_states=True).hidden_states[-NUM_LAYERS:]
        logits = torch.stack([model.lm_head(h[0, at]) for h in hidden])  # (K, V)
        features[row] = logits[:, tokens[0, at + 1]].float()
    return features


def ring_slices(attention_mask: torch.Tensor, positions: torch.Tensor):
    """For one packed micro-batch split over two ring ranks: the rank holding each row's answer position (-1: none),
    and whether some row's tokens lie on both ranks."""
    lengths = attention_mask.sum(1)
    starts = torch.cat([torch.zeros(1, dtype=lengths.dtype), lengths.cumsum(0)[:-1]])
    half = (int(lengths.sum()) + 1) // 2  # upstream pads the packed sequence to a multiple of the ring size
    at = starts + attention_mask.long().cumsum(1).gather(1, positions.clamp(min=0).view(-1, 1)).squeeze(1) - 1
    owners = torch.where(positions >= 0, at // half, -1)
    return owners, bool(((starts < half) & (starts + lengths > half)).any())


@pytest.mark.parametrize("arm", ["dapo", "grpo_ring"])
def test_every_packed_feature_is_its_own_rollouts(arm, request):
    # Step 1's experience forward used the initial weights: the recipe model, recomputed here outside the run.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = request.getfixturevalue(arm)
    model = AutoModelForCausalLM.from_pretrained(recipe_model(), dtype=torch.bfloat16, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(recipe_model())
    dumped = torch.load(os.path.join(run.folder, "feature-dump.pt"))
    stored = torch.cat([row["features"] for row in dumped])
    recomputed = torch.cat([own_features(model, tokenizer, r["sequences"], r["attention_mask"], r["action_mask"])
                            for r in dumped])  # fmt: skip
    lengths = torch.cat([row["attention_mask"].sum(1) for row in dumped])
    assert len(set(lengths.tolist())) > 1  # packed rows of different lengths
    assert (
        stored.shape[1] == NUM_LAYERS and len(stored) % SAMPLES == 0 and len(stored) <= len(RECIPE_QUESTIONS) * SAMPLES
    )
    assert (~stored.isnan().any(1)).sum() >= len(stored) // 2
    if arm == "grpo_ring":  # answers on both ranks of the ring, and rows cut in two by the slice boundary
        slices = [ring_slices(r["attention_mask"], answer_positions(tokenizer, r)) for r in dumped]
        assert {0, 1} <= set(torch.cat([owners for owners, _ in slices]).tolist())
        assert any(straddles for _, straddles in slices)
    torch.testing.assert_close(stored, recomputed, rtol=0.02, atol=0.1, equal_nan=True)  # bf16
    # The comparison tells rows apart: two rows with different features, swapped, disagree.
    valid = (~stored.isnan().any(1)).nonzero().flatten().tolist()
    i, j = next((i, j) for i in valid for j in valid if (stored[i] - stored[j]).abs().max() > 1)
    order = torch.arange(len(stored))
    order[i], order[j] = j, i
    with pytest.raises(AssertionError):
        torch.testing.assert_close(stored[order], recomputed, rtol=0.02, atol=0.1, equal_nan=True)


def test_a_capture_failure_on_one_rank_ends_the_step_with_an_error_naming_it(tmp_path):
    # Rank 1's hooks never match its forward's token count; rank 0 goes on into ZeRO-3's collectives. A hang would
    # end in subprocess.TimeoutExpired.
    run = run_recipe(str(tmp_path), 1, timeout=900, ALGO="dapo", MEDS_TEST_FAIL_CAPTURE_RANK="1")
    assert run.proc.returncode != 0
    # The controller raises it for the step (not some later error), and rank 1 logged it.
    assert "RuntimeError: MEDS: the feature capture failed on policy rank 1: no forward of" in run.log
    assert "ERROR    MEDS: the feature capture failed on policy rank 1: no forward of" in run.log
    assert not run.steps  # no step was logged
