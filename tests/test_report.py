"""python -m meds_patch report: the error memory of a checkpoint as Markdown and readable PNGs."""

import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from meds_patch.openrlhf_glue import memory_state
from meds_patch.report import write_report
from tests.inprocess import build, train_steps
from tests.test_openrlhf_glue import MEDS_ARGS

PLOTS = ("cluster_sizes.png", "penalties.png", "growth.png")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory, local_ray):
    ckpt = str(tmp_path_factory.mktemp("demo"))
    run = build(MEDS_ARGS, ckpt)
    train_steps(run, 3)
    return ckpt, run.maker.meds_memory.summary()


def test_report_summarises_the_demo_checkpoint(demo_checkpoint, tmp_path):
    ckpt, summary = demo_checkpoint
    report = open(write_report(ckpt, str(tmp_path))).read()
    assert "Memory updates (training steps): 3" in report
    assert (
        f"| {summary['memories']} | {summary['memories']} | {summary['vectors']} | {summary['clusters']} |" in report
    )
    assert "Question: what is" in report  # the questions' text is kept with the memory
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
