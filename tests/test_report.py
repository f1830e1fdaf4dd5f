"""python -m meds_patch report: the error memory of a checkpoint as Markdown and readable PNGs."""

import os
import re
import subprocess
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

from meds_patch.core.config import MEDSConfig
from meds_patch.core.memory import ErrorMemory
from meds_patch.integration.glue import PROMPT_SNIPPET, memory_state
from meds_patch.tools.report import (
    bare_question,
    penalty_counts,
    plot_clusters,
    plot_growth,
    plot_penalties,
    question_memories,
    write_report,
)
from tests.inprocess import build, train_steps
from tests.test_openrlhf_glue import MEDS_ARGS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = ("cluster_sizes.png", "penalties.png", "growth.png")
QWEN_MATH = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)  # examples/scripts/meds_recipe_common.sh's --data.input_template


def hand_made_state(labels: dict, prompts: dict, updates: int = 1, **config) -> dict:
    """A memory state as the glue checkpoints it: key -> labels of its stored wrong answers (vectors unused by
    the report), key -> prompt text; every answer arrived at update 1."""
    keys = sorted(labels)
    return {
        "version": 1,
        "config": dict(MEDSConfig(**config).__dict__),
        "keys": keys,
        "correct": [False] * len(keys),
        "vectors": [np.ones((len(labels[k]), 4), np.float32) for k in keys],
        "labels": [np.array(labels[k]) for k in keys],
        "arrivals": [np.ones(len(labels[k]), np.int64) for k in keys],
        "updates": updates,
        "prompts": prompts,
    }


def rows_of(state: dict):
    memory = ErrorMemory()
    memory.load_state_dict(state)
    return question_memories(memory, state.get("prompts", {}))


def save_checkpoint(folder, state: dict) -> str:
    torch.save({"global_step": 1, "meds_memory": state}, os.path.join(folder, "client_states.pt"))
    return str(folder)


# ── The bare question ──


@pytest.mark.parametrize(
    "prompt",
    [
        QWEN_MATH.format("What is 2 + 3?"),
        "Question: What is 2 + 3? Please reason step by step, and put your final answer within \\boxed{}. Answer:",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe exact.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nWhat is 2 + 3?\nLet's think step by step and output the final answer within \\boxed{}."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<s>[INST] <<SYS>>\nBe exact.\n<</SYS>>\n\nWhat is 2 + 3? [/INST]",
        "A conversation between User and Assistant.\nUser: What is 2 + 3?\nAssistant: <think>",
        "What is 2 + 3?",
    ],
    ids=["qwen-math-chatml", "inline-instruction", "llama3", "llama2", "r1-user-assistant", "already-bare"],
)
def test_bare_question_strips_template_system_prompt_and_instruction(prompt):
    assert bare_question(prompt) == "What is 2 + 3?"


def test_bare_question_reads_a_user_turn_cut_by_the_stored_snippet():
    prompt = QWEN_MATH.format("What is 2 + 3?")
    cut = prompt[: prompt.index("<|im_end|>\n<|im_start|>assistant") + 4]  # ends inside "<|im_end|>"
    assert bare_question(cut) == "What is 2 + 3?"


def test_bare_question_keeps_a_prompt_in_an_unknown_template_whole():
    prompt = "<turn role=user>What is 2 + 3?</turn>"
    assert bare_question(prompt) == prompt


def test_bare_question_keeps_boxes_that_hold_something():
    assert bare_question("Question: Simplify \\boxed{x} + x. Answer:") == "Simplify \\boxed{x} + x."


# ── The report of hand-made memories ──


def test_table_shows_the_bare_question_of_a_templated_prompt(tmp_path):
    prompt = QWEN_MATH.format("Find $x$ if $2x = 6$.")[:PROMPT_SNIPPET]  # as the glue stores it
    state = hand_made_state({"k" * 32: [0, 0, -1]}, {"k" * 32: prompt})
    report = open(write_report(save_checkpoint(tmp_path, state), str(tmp_path / "out"))).read()
    assert "| 1 | Find $x$ if $2x = 6$. | wrong | 3 | 2 | 1 |" in report
    assert "im_start" not in report and "Please reason" not in report


def test_a_checkpoint_without_prompts_or_arrivals_still_renders(tmp_path):
    state = hand_made_state({"a" * 32: [0, 0, 1, 1]}, {})
    del state["prompts"], state["arrivals"]  # checkpoints from before either was saved
    report = open(write_report(save_checkpoint(tmp_path, state), str(tmp_path / "out"))).read()
    assert "| 1 | (question text not recorded; key aaaaaaaaaaaa) | wrong | 4 | 2, 2 | 0 |" in report


def test_an_answer_memory_checkpoint_is_refused_by_name(tmp_path):
    from meds_patch.core.memory import AnswerMemory

    memory = AnswerMemory()
    memory.update(["a" * 32], [False], ["85"])
    with pytest.raises(ValueError, match="counts final answers \\(--algo.meds.feature answer\\)"):
        write_report(save_checkpoint(tmp_path, memory.state_dict()), str(tmp_path / "out"))


def test_noise_is_a_bar_of_its_own_with_its_integer_count():
    fig = plot_clusters(rows_of(hand_made_state({"q" * 32: [0, 0, 0, 1, 1, -1, -1, -1, -1]}, {})), MEDSConfig())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "noise"]
    assert [bar.get_height() for bar in ax.containers[0]] == [3, 2, 4]
    assert matplotlib.colors.to_hex(ax.containers[0][2].get_facecolor()) == matplotlib.colors.to_hex("tab:gray")
    plt.close(fig)


def test_count_axes_have_integer_ticks():
    rows = rows_of(hand_made_state({"a" * 32: [0, 0, 0, -1], "b" * 32: [0, 0, 1, 1, 1, -1]}, {}, updates=3))
    config = MEDSConfig()
    figures = [plot_clusters(rows, config), plot_penalties(rows, config), plot_growth(rows, 3, config)]
    ticks = [tick for fig in figures for ax in fig.axes if ax.get_visible() for tick in ax.get_yticks()]
    ticks += list(figures[2].axes[0].get_xticks())
    assert ticks and all(float(t).is_integer() for t in ticks)
    for fig in figures:
        plt.close(fig)


def test_penalty_values_are_the_discrete_terms_of_the_group_sizes():
    # Groups (n): a: clusters 8 and 3, noise 2; b: cluster 2, noise 1. alpha = 0.1, beta = 0.2:
    # p(1) = 0.1 ln 2 = 0.069315, p(2) = 0.1 ln 3 = 0.109861, p(3) = 0.1 ln 4 = 0.138629, p(8) = 0.1 ln 9 -> 0.2.
    labels = {"a" * 32: [0] * 8 + [1] * 3 + [-1] * 2, "b" * 32: [0, 0, -1]}
    counts = penalty_counts(rows_of(hand_made_state(labels, {})), MEDSConfig(alpha=0.1))
    assert list(counts) == pytest.approx([0.069315, 0.109861, 0.138629, 0.2], abs=1e-6)
    assert [(sorted(e["sizes"]), e["clusters"], e["noise"]) for e in counts.values()] == [
        ([1], 0, 1),
        ([2], 2, 2),
        ([3], 3, 0),
        ([8], 8, 0),
    ]


def test_penalty_plot_has_one_bar_per_value_labelled_with_its_sizes():
    labels = {"a" * 32: [0] * 8 + [1] * 3 + [-1] * 2, "b" * 32: [0, 0, -1]}
    fig = plot_penalties(rows_of(hand_made_state(labels, {})), MEDSConfig(alpha=0.1))
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == ["0.069\nn=1", "0.110\nn=2", "0.139\nn=3", "0.200\nn=8\n(cap β)"]
    in_clusters, in_noise = ([bar.get_height() for bar in container] for container in ax.containers)
    assert (in_clusters, in_noise) == ([0, 2, 3, 8], [1, 2, 0, 0])
    plt.close(fig)


def test_noise_votes_give_no_penalty_when_noise_is_not_a_cluster():
    labels = {"a" * 32: [0, 0, 0, -1, -1]}
    counts = penalty_counts(rows_of(hand_made_state(labels, {})), MEDSConfig(alpha=0.1, noise_as_cluster=False))
    assert list(counts) == pytest.approx([0.0, 0.138629], abs=1e-6)  # p(0) = 0, p(3) = 0.1 ln 4
    assert [(sorted(e["sizes"]), e["clusters"], e["noise"]) for e in counts.values()] == [([0], 0, 2), ([3], 3, 0)]


def test_growth_lines_are_labelled_with_question_text_not_hashes():
    prompts = {"a" * 32: QWEN_MATH.format("What is 1 + 1?"), "b" * 32: QWEN_MATH.format("What is 9 + 9?")}
    rows = rows_of(hand_made_state({"a" * 32: [0, 0, -1], "b" * 32: [-1]}, prompts))
    fig = plot_growth(rows, 1, MEDSConfig())
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["#1 What is 1 + 1?", "#2 What is 9 + 9?", "mean over all 2 memories"]
    plt.close(fig)


def test_questions_with_latex_matplotlib_cannot_parse_still_render(tmp_path):
    prompt = "Question: Is $\\unknownmacro{3} > \\frac{1}{2}$? Answer:"
    state = hand_made_state({"k" * 32: [0, 0, -1]}, {"k" * 32: prompt})
    write_report(save_checkpoint(tmp_path, state), str(tmp_path / "out"))
    assert all(os.path.isfile(tmp_path / "out" / name) for name in PLOTS)


# ── The report of a real run ──


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory, local_ray):
    ckpt = str(tmp_path_factory.mktemp("demo"))
    run = build(MEDS_ARGS, ckpt)
    train_steps(run, 3)
    return ckpt, run.maker.meds_state.memory.summary()


def test_report_summarises_the_demo_checkpoint(demo_checkpoint, tmp_path):
    ckpt, summary = demo_checkpoint
    report = open(write_report(ckpt, str(tmp_path))).read()
    assert "Memory updates (training steps): 3" in report
    assert (
        f"| {summary['memories']} | {summary['memories']} | {summary['vectors']} | {summary['clusters']} |" in report
    )
    # The demo's prompts are "Question: what is a + b? Please put your final answer within \boxed{}. Answer:".
    assert re.search(r"^\| 1 \| what is \d+ \+ \d+\? \| wrong \|", report, re.M)
    assert "Question:" not in report and "boxed" not in report
    for name in PLOTS:
        image = matplotlib.image.imread(os.path.join(tmp_path, name))
        assert image.shape[0] > 200 and image.shape[1] > 300


def test_report_command_writes_beside_the_checkpoint(demo_checkpoint):
    ckpt, _ = demo_checkpoint
    result = subprocess.run([sys.executable, "-m", "meds_patch", "report", ckpt], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(os.path.join("meds_report", "report.md"))
    assert all(os.path.isfile(os.path.join(ckpt, "meds_report", name)) for name in PLOTS)


def test_report_reads_the_memory_from_a_deepspeed_model_states_file(demo_checkpoint, tmp_path):
    ckpt, summary = demo_checkpoint
    run = build(MEDS_ARGS, str(tmp_path / "unused"))
    train_steps(run, 1)
    # DeepSpeed merges client_state into the model-states dict of the tag folder and names the tag in "latest".
    tag = tmp_path / "ckpt" / "_actor" / "global_step1"
    tag.mkdir(parents=True)
    states = {"module": {"w": torch.zeros(2)}, "global_step": 1, "meds_memory": memory_state(run.maker)}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (tag.parent / "latest").write_text("global_step1")
    report = open(write_report(str(tmp_path / "ckpt"))).read()
    assert "mp_rank_00_model_states.pt" in report and "Memory updates (training steps): 1" in report


def test_a_checkpoint_without_memory_gets_a_clear_error(tmp_path):
    torch.save({"global_step": 1}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(FileNotFoundError, match="no MEDS error memory"):
        write_report(str(tmp_path))
