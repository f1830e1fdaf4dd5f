"""Several data-parallel policy ranks over a Ray cluster of two nodes on this machine (the head at 127.0.0.1 with
the vLLM engine and rank 0, a second node at 127.0.0.2 with rank 1), through ``ray job submit`` of upstream's
``train_ppo_ray``. The demo's own run on two nodes (``demo --nodes 2``: a memory sharded over two actors, the
test-only feature dump on) serves the tests that read it; ZeRO-3 over two ranks runs in ``test_recipe_cpu.py``."""

import math
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from meds_patch.core.features import find_answer_positions
from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster, scalars, submit
from meds_patch.cpu.demo import QUESTIONS, training_args
from meds_patch.cpu.tiny_math import prepared_model, write_prompts
from meds_patch.tools.report import find_memory_state
from tests.test_e2e import train

FEATURE_DUMP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_dump")
NUM_LAYERS = 4  # training_args' --algo.meds.num_layers, and all of the tiny model's blocks


def demo(*args: str) -> str:
    env = {**os.environ, "MEDS_TEST_FEATURE_DUMP": "1", "PYTHONPATH": FEATURE_DUMP}
    done = subprocess.run([sys.executable, "-m", "meds_patch", "demo", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def two_node_demo(tmp_path_factory):
    """The demo on two nodes for 2 steps at alpha 0.2, then resumed for a third without its options."""
    folder = tmp_path_factory.mktemp("demo")
    printed = demo("--nodes", "2", "--steps", "2", "--save", str(folder), "--alpha", "0.2")
    steps = scalars(os.path.join(folder, "tensorboard"), "train/")
    saved, _ = find_memory_state(os.path.join(folder, "ckpt"))
    resumed = demo("--resume", str(folder), "--steps", "1")  # on 2 nodes and at alpha 0.2, as it was started
    return SimpleNamespace(folder=str(folder), printed=printed, steps=steps, saved=saved, resumed=resumed)


def test_policy_ranks_and_memory_shards_run_on_both_nodes(two_node_demo):
    lines = [line.strip().split(": ", 1) for line in two_node_demo.printed.splitlines() if line.startswith("  ")]
    placed = {name: where for name, *where in lines if where}  # the demo lists where each actor ran
    for actor in ("PolicyModelActor", "MemoryShard"):
        # One on each node: the worker node's address, and the head's (Ray may name it by the machine's address).
        where = placed[actor][0].split(", ")
        assert len(where) == len(set(where)) == 2 and "127.0.0.2" in where


def test_two_ranks_penalise_recurring_wrong_answers(two_node_demo):
    steps = two_node_demo.steps
    assert steps[1]["train/meds/penalty_mean"] == 0.0 and steps[2]["train/meds/penalty_mean"] > 0
    assert [steps[s]["train/meds/memories"] for s in (1, 2)] == [len(QUESTIONS)] * 2


def test_two_ranks_save_the_memory_once_in_the_checkpoint(two_node_demo):
    state = two_node_demo.saved
    assert len(state["keys"]) == len(set(state["keys"])) == len(QUESTIONS)
    assert sum(len(v) for v in state["vectors"]) == two_node_demo.steps[2]["train/meds/stored_vectors"]


def features_from_the_model(model, tokenizer, row) -> torch.Tensor:
    """The layer logits of each row at its answer token, recomputed from the row's tokens alone through the model's
    own ``output_hidden_states`` (not MEDS's hooks): the last K hidden states (the last one normed, as the model
    returns it) read through the LM head at the answer position, for the token after it."""
    sequences, attention_mask, action_mask = row["sequences"], row["attention_mask"], row["action_mask"]
    batch, length = sequences.shape
    response_start = torch.where(
        action_mask.any(1), action_mask.long().argmax(1) + length - action_mask.shape[1], length
    )
    positions = find_answer_positions(sequences, response_start, tokenizer, attention_mask=attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # as upstream's Actor
    with torch.no_grad():
        hidden = model(sequences, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True)
    rows, at = torch.arange(batch), positions.clamp(min=0)
    logits = torch.stack([model.lm_head(h[rows, at]) for h in hidden.hidden_states[-NUM_LAYERS:]], 1)  # (B, K, V)
    target = sequences[rows, (at + 1).clamp(max=length - 1)]
    values = logits.gather(-1, target.view(-1, 1, 1).expand(-1, NUM_LAYERS, 1)).squeeze(-1).float()
    return values.masked_fill((positions < 0).view(-1, 1), math.nan)


def test_every_feature_is_its_own_rollouts(two_node_demo):
    # Step 1's experience forward used the initial weights: the prepared model, recomputed here outside the run.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(prepared_model(), dtype=torch.bfloat16, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(prepared_model())
    dumped = torch.load(os.path.join(two_node_demo.folder, "feature-dump.pt"))
    assert len(dumped) >= 2  # each rank's share of the step arrived as its own Experiences
    stored, recomputed = [], []
    for row in dumped:
        lengths = row["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) > 1  # rows of different lengths within one share
        stored.append(row["features"])
        recomputed.append(features_from_the_model(model, tokenizer, row))
    stored, recomputed = torch.cat(stored), torch.cat(recomputed)
    assert stored.shape == (len(QUESTIONS) * 8, NUM_LAYERS) and (~stored.isnan().any(1)).sum() >= len(stored) // 2
    torch.testing.assert_close(stored, recomputed, rtol=0.02, atol=0.1, equal_nan=True)  # bf16
    # The comparison can tell rows apart: two rows with different features, swapped, disagree.
    valid = (~stored.isnan().any(1)).nonzero().flatten()
    i, j = next((i, j) for i in valid.tolist() for j in valid.tolist() if (stored[i] - stored[j]).abs().max() > 1)
    order = torch.arange(len(stored))
    order[i], order[j] = j, i
    with pytest.raises(AssertionError):
        torch.testing.assert_close(stored[order], recomputed, rtol=0.02, atol=0.1, equal_nan=True)


def test_a_node_without_the_import_hook_stops_the_run_at_the_first_step_naming_it(tmp_path):
    with LocalRayCluster(env=CPU_ENV, nodes=2, node_gpus=1, node_env={"MEDS_PATCH_DISABLE": "1"}) as cluster:
        run = train(cluster, str(tmp_path), 2, nodes=2, succeed=False)
    assert "MEDS: the meds_patch import hook on node(s) 127.0.0.2 is not active" in run.log
    assert not run.scalars("train/")  # no step was logged


def test_a_node_lost_mid_run_ends_the_job_and_a_resubmission_continues_from_the_last_checkpoint(tmp_path):
    folder = str(tmp_path)
    killed = []

    def kill_node_after_the_second_step(cluster, line):
        # Step 2 is logged, then checkpointed: the node dies while the run saves it or starts step 3.
        if not killed and 2 in scalars(os.path.join(folder, "tensorboard"), "train/reward"):
            cluster.kill_node(1)
            killed.append(time.time())

    with LocalRayCluster(env=CPU_ENV, nodes=2, node_gpus=1) as cluster:
        prompts = write_prompts(os.path.join(folder, "prompts.jsonl"), QUESTIONS)
        args = training_args(prepared_model(), prompts, folder, 6, nodes=2)
        lines = []
        job = threading.Thread(target=lambda: lines.append(submit(
            cluster, args, os.path.join(folder, "job.log"), lambda line: kill_node_after_the_second_step(cluster, line)
        )))  # fmt: skip
        job.start()
        job.join(timeout=900)
        assert killed and not job.is_alive(), "the job did not end within 15 min"
        assert lines[0] != 0  # the job failed
        print(f"the job ended {time.time() - killed[0]:.0f} s after the node was lost")
    saved, _ = find_memory_state(os.path.join(folder, "ckpt"))  # the latest checkpoint is whole: it loads
    saved_vectors = sum(len(v) for v in saved["vectors"])
    with LocalRayCluster(env=CPU_ENV, nodes=2, node_gpus=1) as cluster:
        resumed = train(cluster, folder, 4, nodes=2)
    assert f"MEDS: restored {{'memories': {len(QUESTIONS)}, 'vectors': {saved_vectors}," in resumed.log
    assert max(resumed.scalars("train/reward")) == 4


def test_the_demo_on_two_nodes_trains_and_resumes(two_node_demo):
    resumed, saved = two_node_demo.resumed, two_node_demo.saved
    assert (
        f"MEDS: restored {{'memories': {len(QUESTIONS)}, 'vectors': {sum(len(v) for v in saved['vectors'])},"
        in resumed
    )
    assert "step 3:" in resumed
    # At the default alpha 0.1 the cap beta = 2 alpha = 0.2 bounds every penalty; at 0.2 a cluster of n >= 2
    # earlier wrong answers costs 0.2 ln 3 = 0.22.
    penalties = scalars(os.path.join(two_node_demo.folder, "tensorboard"), "train/meds/penalty_max")
    assert penalties[3]["train/meds/penalty_max"] > 0.2
