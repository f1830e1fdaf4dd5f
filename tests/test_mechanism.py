"""bench/mechanism.py's quick mode runs the whole pipeline (the real memory, penalty and diagnostic inside the
simulated training loop, every kind of arm, the tables, the plot, the JSON); the figures live in BENCHMARKS.md §8."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mechanism_quick_mode_prints_every_table_and_writes_its_plot_and_json(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/mechanism.py", "--quick", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    headings = ["**grpo**", "**dr_grpo**", "**dapo**", "**Effect against α**", "**Effect against cluster quality**"]
    headings += ["**Per question**", "**Where the penalty goes**", "**Where MEDS cannot act: one wrong mode**"]
    headings += ["**The appendix's claim in the loop**"]
    for heading in headings:
        assert heading in out, heading
    assert "| meds-0.1 |" in out and "| answer-0.1 |" in out and "| flat-0.1 |" in out
    assert (tmp_path / "mechanism_quick.png").stat().st_size > 0

    saved = json.loads((tmp_path / "mechanism_quick.json").read_text())
    assert set(saved["study"]) == {"grpo", "dr_grpo", "dapo"}
    meds = saved["study"]["grpo"]["meds-0.1"]
    assert len(meds["per_seed"]["pass@1"]) == saved["setup"]["seeds"]
    assert len(meds["curves"]["pass@1"]) == saved["setup"]["steps"] + 1
    assert "one-mode:meds-0.1" in saved["study"]["dr_grpo"] and "one-mode:none" not in saved["study"]["dapo"]
