"""``python -m meds_patch eval`` (issue 26): the tiny task's questions in the benchmarks' JSONL format, n = 16, the
tiny model's prompt. The trained model is ``prepared_model()``; its starting model is the random initialisation it
was fine-tuned from (``tiny_model`` with the same seed), saved to a folder. That pair costs a few seconds (the
prepared model is cached for the demo's tests) and differs clearly: the start never writes a ``\\boxed{}``.

Four vLLM engines in three processes: the pair in one (the table, JSON and plots), then the trained model alone,
killed after its first saved question, and run again (it resumes, and gives the numbers of the first run)."""

import contextlib
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from meds_patch.__main__ import main
from meds_patch.cpu.cluster import CPU_ENV
from meds_patch.cpu.tiny_math import PAIRS, PROMPT, prepared_model, tiny_model, tiny_tokenizer
from meds_patch.tools import evaluate as evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "what is {a} + {b}?"
TEMPLATE = PROMPT.replace(QUESTION, "{}")  # the tiny model's prompt, the question left open
SETS = ("sum_1digit", "sum_2digit")
PER_SET, N = 8, 16
TOTAL = PER_SET * len(SETS)


def eval_command(out, models, data):
    return [
        sys.executable, "-m", "meds_patch", "eval", *[arg for model in models for arg in ("--model", model)],
        "--data", data, "--sets", *SETS, "--out", out, "--n", str(N), "--max-tokens", "32", "--template", TEMPLATE,
    ]  # fmt: skip


def saved_questions(out):
    """Whole question lines in the samples files (each file's first line is its header)."""
    return sum(open(path).read().count("\n") - 1 for path in glob.glob(os.path.join(out, "samples", "*", "*.jsonl")))


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """The evaluation files, the two models, and one run of `eval` over both (init is the baseline)."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    data.mkdir()
    pairs = list(PAIRS)
    random.Random(0).shuffle(pairs)
    for name, picked in zip(SETS, ([p for p in pairs if sum(p) < 10], [p for p in pairs if sum(p) >= 10])):
        with open(data / f"{name}.jsonl", "w") as fh:
            for a, b in picked[:PER_SET]:
                fh.write(json.dumps({"problem": QUESTION.format(a=a, b=b), "answer": str(a + b), "datasource": name}))
                fh.write("\n")
    assert TEMPLATE.format(QUESTION.format(a=3, b=4)) == PROMPT.format(a=3, b=4)

    tokenizer = tiny_tokenizer()
    start = tiny_model(tokenizer)  # seed 0: the initialisation tuned_model fine-tunes
    start.generation_config.eos_token_id = tokenizer.eos_token_id
    start.generation_config.pad_token_id = tokenizer.pad_token_id
    start.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    models = [str(root / "init"), prepared_model()]

    out = str(root / "out")
    run = subprocess.run(
        eval_command(out, models, str(data)), env={**os.environ, **CPU_ENV}, cwd=REPO, capture_output=True,
        text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    return {
        "data": str(data),
        "models": models,
        "out": out,
        "results": json.load(open(os.path.join(out, "results.json"))),
    }


def test_the_default_template_is_the_recipes_prompt():
    # The recipe's line, read by bash itself: $'...' is bash's quoting, not Python's.
    with open(os.path.join(REPO, "examples", "scripts", "meds_recipe_common.sh")) as fh:
        line = next(line for line in fh if line.startswith("PROMPT_TEMPLATE=$'"))
    script = 'eval "$LINE"; printf %s "$PROMPT_TEMPLATE"'
    recipe = subprocess.run(["bash", "-c", script], env={"LINE": line}, capture_output=True, text=True, check=True)
    assert recipe.stdout == evaluation.QWEN_MATH_TEMPLATE
    assert "\\boxed{}" in evaluation.QWEN_MATH_TEMPLATE.format("Q")


def test_bad_input_is_one_error_naming_each_problem_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "generate", lambda *args: pytest.fail("a model was loaded"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aime24.jsonl").write_text('{"problem": "1 + 1?", "answer": "2"}\n')
    (tmp_path / "data" / "broken.jsonl").write_text('{"problem": "1 + 1?"}\n')
    for name in ("no_weights", "half_copied"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "tokenizer.json").write_text("{}")
    (tmp_path / "half_copied" / "model-00001-of-00002.safetensors").write_text("")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "half_copied" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    models = [arg for name in ("no_weights", "absent", "half_copied") for arg in ("--model", str(tmp_path / name))]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *models,
              "--sets", "aime24", "aime2024", "broken", "--template", "{} {}"])  # fmt: skip
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "python -m meds_patch eval: error: 6 problem(s), nothing was run:" in error
    assert f"set 'aime2024': no file {tmp_path / 'data' / 'aime2024.jsonl'} (sets in " in error
    assert "aime24, broken)" in error
    assert "broken.jsonl, line 1: not a JSON row with a `problem` and an `answer`" in error
    assert f"--model {tmp_path / 'no_weights'}: no weights (*.safetensors or pytorch_model*.bin)" in error
    assert f"--model {tmp_path / 'absent'}: not a folder" in error
    assert "model.safetensors.index.json names shards that are not there: model-00002-of-00002.safetensors" in error
    assert "--template needs one {} for the question" in error
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--model", str(tmp_path)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"--data {tmp_path / 'nowhere'}: no such folder" in error
    assert f"--model {tmp_path}: no config.json; no weights" in error


def record(index, correct, timed_out=None, problem="1 + 1?", answer="2"):
    return {
        "index": index, "problem": problem, "answer": answer, "correct": correct,
        "answers": ["2" if ok else None for ok in correct], "timed_out": timed_out or [False] * len(correct),
        "tokens": [10] * len(correct), "truncated": [False] * len(correct),
    }  # fmt: skip


def test_a_cut_last_line_is_dropped_and_samples_made_otherwise_are_refused(tmp_path):
    path = str(tmp_path / "set.jsonl")
    header = {"model": "/m", "set": "set", "n": 4, "seed": 0}
    rows = [{"problem": "1 + 1?", "answer": "2"}, {"problem": "2 + 2?", "answer": "4"}]
    with open(path, "w") as fh:
        fh.write(json.dumps(header) + "\n" + json.dumps(record(0, [True] * 4)) + "\n" + '{"index": 1, "probl')
    assert list(evaluation.read_saved(path, header, rows)) == [0]
    assert open(path).read().endswith("[false, false, false, false]}\n")  # cut back to the last whole line
    with pytest.raises(evaluation.InputError, match=r"made otherwise \(n 4 there, 8 now\): use another --out"):
        evaluation.read_saved(path, dict(header, n=8), rows)
    with pytest.raises(evaluation.InputError, match="question 0 is not the data file's any more"):
        evaluation.read_saved(path, header, [{"problem": "1 + 1?", "answer": "3"}])


def test_pass_at_k_timeouts_and_the_difference_of_hand_made_samples():
    # Baseline: 0, 2 and 4 of 4 samples right; the other model: 1, 3 and 4, one of its wrong samples timed out.
    base = [record(0, [False] * 4), record(1, [True, True, False, False]), record(2, [True] * 4)]
    other = [record(0, [True, False, False, False], [False, True, False, False]), record(1, [True] * 3 + [False])]
    other.append(record(2, [True] * 4))
    settings = {"template": "{}", "n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "seed": 0}
    results = evaluation.summarise({("/a", "s"): base, ("/b", "s"): other}, ["/a", "/b"], ["s"], settings)
    assert results["ks"] == [1, 2, 4]
    first, second = results["models"]
    # pass@2 = 1 - C(4 - c, 2) / C(4, 2): c = 0, 1, 2, 3, 4 give 0, 1/2, 5/6, 1, 1.
    assert first["sets"]["s"]["pass@k"] == pytest.approx({"1": 0.5, "2": (0 + 5 / 6 + 1) / 3, "4": 2 / 3})
    assert second["sets"]["s"]["pass@k"] == pytest.approx({"1": (1 + 3 + 4) / 12, "2": (1 / 2 + 1 + 1) / 3, "4": 1})
    assert second["average"] == second["sets"]["s"]["pass@k"]
    assert (first["sets"]["s"]["timeouts"], second["sets"]["s"]["timeouts"]) == (0, 1)
    difference = second["difference"]["s"]["1"]
    assert difference["mean"] == pytest.approx(1 / 6)
    assert difference["low"] <= difference["mean"] <= difference["high"]
    assert second["difference"]["s"]["4"]["low"] == pytest.approx(0)  # question 0's +1 may not be drawn
    markdown = evaluation.results_markdown(results, ["s"])
    assert "Grading timeouts (scored 0): 1 of 24 answers." in markdown
    assert "| b − a | +0.167 [" in markdown


def test_eval_writes_a_table_json_and_plots_that_agree(tiny_eval):
    out, results = tiny_eval["out"], tiny_eval["results"]
    for name in ("results.md", *[f"pass_at_k_{scope}.png" for scope in (*SETS, "average")]):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    markdown = open(os.path.join(out, "results.md")).read()
    assert results["ks"] == [1, 2, 4, 8, 16]
    start, trained = results["models"]
    for entry in (start, trained):
        assert results["timing"][entry["label"]]["questions"] == TOTAL
        for name in SETS:
            values = [entry["sets"][name]["pass@k"][str(k)] for k in results["ks"]]
            assert values == sorted(values), (entry["label"], name, values)  # non-decreasing in k
            questions = entry["sets"][name]["questions"]
            assert [len(q["correct"]) for q in questions] == [N] * PER_SET
            mean_correct = sum(sum(q["correct"]) / N for q in questions) / len(questions)
            assert values[0] == pytest.approx(mean_correct)
            assert values[-1] == pytest.approx(sum(any(q["correct"]) for q in questions) / len(questions))
            assert entry["sets"][name]["timeouts"] == 0
        row = f"| {entry['label']} | " + " | ".join(f"{entry['average'][str(k)]:.3f}" for k in results["ks"])
        assert row in markdown
    assert start["sets"][SETS[0]]["no_box"] == 1.0  # random weights never write a box
    # The fine-tuned model against its start: pass@16 is higher, and the interval over questions excludes 0.
    gain = trained["difference"]["average"]["16"]
    assert gain["mean"] == pytest.approx(trained["average"]["16"] - start["average"]["16"])
    assert 0 < gain["low"] <= gain["mean"] <= gain["high"]


def test_a_killed_evaluation_continues_without_redoing_questions_and_gives_the_same_numbers(tiny_eval, tmp_path):
    out, trained = str(tmp_path / "out"), tiny_eval["models"][1]
    command, env = eval_command(out, [trained], tiny_eval["data"]), {**os.environ, **CPU_ENV}
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while killed.poll() is None and saved_questions(out) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the command, its vLLM engine and its grading processes
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    done = saved_questions(out)
    assert 1 <= done < TOTAL, open(tmp_path / "killed.log").read()[-3000:]

    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert f"{done} of {TOTAL} questions saved before, {TOTAL - done} to generate" in rerun.stderr
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["timing"][os.path.basename(trained)]["questions"] == TOTAL - done
    assert saved_questions(out) == TOTAL  # each question once

    # The same model evaluated twice (once with an interruption, alone, in other batches): the same samples.
    first = tiny_eval["results"]["models"][1]
    for name in SETS:
        assert results["models"][0]["sets"][name] == first["sets"][name]
    assert results["models"][0]["average"] == first["average"]

    # Once more: every question is saved, so no model loads and the table is written again.
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert f"{TOTAL} of {TOTAL} questions saved before, 0 to generate" in again.stderr
    assert json.load(open(os.path.join(out, "results.json")))["timing"] == {}
