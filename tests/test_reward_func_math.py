import asyncio
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from meds_patch.tools import math_reward

_PATH = Path(__file__).resolve().parents[1] / "examples" / "reward_func_math.py"
_SPEC = importlib.util.spec_from_file_location("reward_func_math", _PATH)
reward_func_math = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reward_func_math)

PROMPT = "<|user|>Solve the problem and put the final answer in \\boxed{}.<|assistant|>"
LIMIT = 2.0  # seconds per answer in these tests (MEDS_REWARD_TIMEOUT), instead of the default 5
# Time to notice a timeout, kill the worker and hand back the result, on a busy 2-core machine.
MARGIN = 3.0
# Answers that keep sympy busy for minutes (issue 9): towers of powers and iterated factorials.
HANGING_ANSWERS = ["9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "9!!!!!", "(10^{10})!"]
WORKERS = int(os.environ.get("MEDS_REWARD_WORKERS", min(math_reward.DEFAULT_MAX_WORKERS, os.cpu_count())))


@pytest.fixture(autouse=True, scope="module")
def short_limit():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDS_REWARD_TIMEOUT", str(LIMIT))
        yield


def score(response, label, prompt=PROMPT):
    """Reward of one response, called the way OpenRLHF calls it (one-element lists)."""
    return reward_func_math.reward_func([prompt + response], [prompt], [label])["rewards"].item()


def test_plain_integer_match():
    assert score("So the answer is \\boxed{42}.", "42") == 1.0


def test_wrong_answer():
    assert score("So the answer is \\boxed{41}.", "42") == 0.0


@pytest.mark.parametrize("label", ["1/2", "0.5", "\\frac{1}{2}"])
def test_fraction_matches_equivalent_label(label):
    assert score("\\boxed{\\frac{1}{2}}", label) == 1.0


def test_fraction_does_not_match_different_value():
    assert score("\\boxed{\\frac{1}{2}}", "1/3") == 0.0


def test_dfrac_matches_frac():
    assert score("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}") == 1.0


def test_left_right_delimiters_are_ignored():
    assert score("\\boxed{\\left( 1, 2 \\right)}", "(1,2)") == 1.0


def test_ordered_pair_order_matters():
    assert score("\\boxed{(2, 1)}", "(1,2)") == 0.0


def test_equivalent_surds():
    assert score("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0


def test_missing_box_gives_zero():
    result = reward_func_math.reward_func([PROMPT + "The answer is 42."], [PROMPT], ["42"])
    assert result["rewards"].item() == 0.0
    assert result["extra_logs"]["boxed_found"].item() == 0.0


def test_last_box_is_judged():
    assert score("First \\boxed{41}, no wait: \\boxed{42}.", "42") == 1.0
    assert score("First \\boxed{42}, no wait: \\boxed{41}.", "42") == 0.0


def test_nested_braces():
    assert score("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\sqrt{3}/2") == 1.0


def test_boxed_with_space_and_fbox():
    assert score("\\boxed {7}", "7") == 1.0
    assert score("\\fbox{7}", "7") == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "",
        "}{",
        "\\boxed{",
        "\\boxed{\\frac{1}{2}",
        "\\boxed{}}}",
        "\\boxed{\\frac{}{}^^_}",
        "\\boxed{$$\\\\}",
        "\x00\ud800",
    ],
)
def test_garbage_gives_zero_without_raising(response):
    assert score(response, "1/2") == 0.0


def test_empty_label_gives_zero():
    assert score("\\boxed{1}", "") == 0.0


def test_batch_gives_per_sample_results():
    responses = ["\\boxed{3}", "\\boxed{4}", "no box", "\\boxed{0.5}"]
    labels = ["3", "3", "3", "1/2"]
    result = reward_func_math.reward_func([PROMPT + r for r in responses], [PROMPT] * 4, labels)
    for key, expected in [("rewards", [1.0, 0.0, 0.0, 1.0]), ("scores", [1.0, 0.0, 0.0, 1.0])]:
        assert result[key].dtype == torch.float32 and result[key].shape == (4,)
        assert result[key].tolist() == expected
    boxed_found = result["extra_logs"]["boxed_found"]
    assert boxed_found.dtype == torch.float32 and boxed_found.shape == (4,)
    assert boxed_found.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_empty_batch():
    result = reward_func_math.reward_func([], [], [])
    assert result["rewards"].shape == (0,) and result["scores"].shape == (0,)


def test_works_from_non_main_thread():
    # OpenRLHF runs reward_func via asyncio.to_thread; math-verify's default signal-based timeouts fail there.
    results = {}
    thread = threading.Thread(target=lambda: results.update(correct=score("\\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == {"correct": 1.0}


def test_query_not_starting_with_prompt():
    # e.g. the decoded query differs slightly from the prompt text: the whole query is searched.
    result = reward_func_math.reward_func(["retokenized prompt ... \\boxed{42}"], [PROMPT], ["42"])
    assert result["rewards"].item() == 1.0


def test_box_in_prompt_is_not_judged():
    prompt = PROMPT + " Example: \\boxed{42}."
    assert score("I do not know.", "42", prompt=prompt) == 0.0


def test_intervals_compare_endpoints_and_brackets():
    assert score("\\boxed{[1, 2)}", "[1,2)") == 1.0
    assert score("\\boxed{(1, 2]}", "[1,2)") == 0.0
    assert score("\\boxed{(-\\infty, 3] \\cup [5, \\infty)}", "(-\\infty,3]\\cup[5,\\infty)") == 1.0


def test_sets_ignore_order_but_not_members():
    assert score("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}") == 1.0
    assert score("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}") == 0.0


def test_units_and_symbols_after_a_number_are_ignored():
    assert score("\\boxed{5\\text{ cm}}", "5") == 1.0
    assert score("\\boxed{30^\\circ}", "30") == 1.0
    assert score("\\boxed{12\\%}", "12") == 1.0


def test_text_answers_compare_as_text():
    assert score("\\boxed{\\text{Monday}}", "Monday") == 1.0
    assert score("\\boxed{\\text{Tuesday}}", "Monday") == 0.0
    assert score("\\boxed{\\textbf{(B)}}", "B") == 1.0


async def timed_call(response, label):
    """One rollout's reward the way OpenRLHF 0.11.2 asks for it, and the seconds until it came back."""
    start = time.perf_counter()
    result = await asyncio.to_thread(reward_func_math.reward_func, [PROMPT + response], [PROMPT], [label])
    return result, time.perf_counter() - start


@pytest.mark.parametrize("answer", HANGING_ANSWERS)
def test_hanging_answer_scores_zero_within_the_limit(answer):
    result, seconds = asyncio.run(timed_call(f"\\boxed{{{answer}}}", "81"))
    assert result["rewards"].item() == 0.0 and result["scores"].item() == 0.0
    assert result["extra_logs"]["verify_timeout"].item() == 1.0
    assert seconds < LIMIT + MARGIN


def test_calls_from_many_threads_at_once_all_return_in_time():
    # Every hanging answer and as many ordinary ones in flight together: each worker takes the hanging answers
    # in turn, so the last call waits for ceil(4 / WORKERS) limits; ordinary answers keep their grade.
    calls = [(f"\\boxed{{{answer}}}", "81", 0.0) for answer in HANGING_ANSWERS]
    calls += [("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0), ("\\boxed{7}", "8", 0.0)] * 2

    async def all_at_once():
        return await asyncio.gather(*(timed_call(response, label) for response, label, _ in calls))

    results = asyncio.run(all_at_once())
    assert [result["rewards"].item() for result, _ in results] == [expected for _, _, expected in calls]
    timed_out = [result["extra_logs"]["verify_timeout"].item() for result, _ in results]
    assert timed_out == [1.0] * 4 + [0.0] * 4
    assert max(seconds for _, seconds in results) < math.ceil(len(HANGING_ANSWERS) / WORKERS) * LIMIT + MARGIN


def test_ordinary_answers_grade_normally_after_a_timeout():
    assert score("\\boxed{9^{9^{9^{9}}}}", "81") == 0.0
    with ThreadPoolExecutor(4) as threads:
        rewards = list(threads.map(score, ["\\boxed{\\frac{1}{2}}", "\\boxed{3}"] * 4, ["0.5", "4"] * 4))
    assert rewards == [1.0, 0.0] * 4


def test_timeout_is_logged_with_the_answer_truncated(caplog):
    answer = "9^{9^{9^{9}}}" + "+1" * 300
    with caplog.at_level(logging.WARNING, logger="meds_patch.tools.math_reward"):
        assert score(f"\\boxed{{{answer}}}", "81") == 0.0
    [message] = [record.getMessage() for record in caplog.records if record.name == "meds_patch.tools.math_reward"]
    assert repr(answer[:200]) in message and answer[:201] not in message
    assert f"over {LIMIT:g} s" in message


@pytest.mark.parametrize("variable", ["MEDS_REWARD_TIMEOUT", "MEDS_REWARD_WORKERS"])
@pytest.mark.parametrize("value", ["0", "-2", "soon", "nan", "inf"])
def test_bad_settings_are_rejected_by_name(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        score("\\boxed{1}", "1")


_OPENRLHF_LIKE_CALLER = """
import asyncio, importlib.util, json, os, sys, time

import psutil

TAG = os.environ["MEDS_TEST_CALLER"] = str(os.getpid())  # inherited by the processes that grade for this script


def ours(process):
    try:
        command = " ".join(process.cmdline())
        return "multiprocessing.forkserver import main" in command and process.environ().get("MEDS_TEST_CALLER") == TAG
    except psutil.Error:
        return False


def main():
    import torch  # the caller's own torch, as in a vLLM actor

    torch.ones(1)
    spec = importlib.util.spec_from_file_location("reward_func", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.reward_func(["\\\\boxed{1}"], [""], ["1"])  # starts the pool

    async def two_rollouts():
        return await asyncio.gather(
            asyncio.to_thread(module.reward_func, ["\\\\boxed{(10^{10})!}"], [""], ["1"]),
            asyncio.to_thread(module.reward_func, ["\\\\boxed{1/2}"], [""], ["0.5"]),
        )

    start = time.perf_counter()
    hanging, ordinary = asyncio.run(two_rollouts())
    seconds = time.perf_counter() - start
    # pebble's workers: forks of the forkserver of the grading process this script started, which inherit the tag.
    servers = {p.pid for p in psutil.process_iter() if ours(p)}
    workers = [pid for pid in servers if psutil.Process(pid).ppid() in servers]
    maps = {pid: open(f"/proc/{pid}/maps").read() for pid in ["self", *workers]}
    print(json.dumps({
        "rewards": [hanging["rewards"].item(), ordinary["rewards"].item()],
        "seconds": seconds,
        "workers": len(workers),
        "libtorch": {str(pid): "libtorch" in text for pid, text in maps.items()},
    }))


if __name__ == "__main__":
    main()
"""


def test_works_loaded_by_path_under_a_script_main_and_workers_carry_no_torch(tmp_path):
    # OpenRLHF's vLLM actors run under Ray's worker script (a __main__ with a path, which worker processes
    # import again) and load this file by path; the workers must not inherit the caller's torch.
    script = tmp_path / "actor.py"
    script.write_text(_OPENRLHF_LIKE_CALLER)
    run = subprocess.run([sys.executable, str(script), str(_PATH)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["rewards"] == [0.0, 1.0]
    assert report["seconds"] < LIMIT + MARGIN
    assert report["workers"] >= 1 and report["libtorch"].pop("self") is True
    assert not any(report["libtorch"].values())


# A small script as a user writes one to try the reward function: no main guard, run as a file, from standard
# input or with -c. Worker processes must not run it again (nor fail to find '<stdin>').
_UNGUARDED_CALLER = """
import importlib.util, json, sys

spec = importlib.util.spec_from_file_location("reward_func", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.reward_func(["\\\\boxed{2}", "\\\\boxed{3}"], ["", ""], ["2", "2"])["rewards"].tolist()))
"""


def rewards_printed(command, **kwargs):
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_grades_right_when_called_from_an_unguarded_script(tmp_path):
    script = tmp_path / "try_reward.py"
    script.write_text(_UNGUARDED_CALLER)
    assert rewards_printed([sys.executable, str(script), str(_PATH)]) == [1.0, 0.0]


def test_grades_right_when_called_from_standard_input():
    assert rewards_printed([sys.executable, "-", str(_PATH)], input=_UNGUARDED_CALLER) == [1.0, 0.0]


def test_grades_right_when_main_has_no_file():
    # As in a notebook: code run in a __main__ module that has neither a file nor a module name.
    assert rewards_printed([sys.executable, "-c", _UNGUARDED_CALLER, str(_PATH)]) == [1.0, 0.0]


_CALLER_WHOSE_GRADER_CANNOT_START = """
import os
from meds_patch.tools.math_reward import judge

# Set after this interpreter started: every new one fails at start-up, before it can import anything.
os.environ["PYTHONIOENCODING"] = "no-such-codec"
print(judge(["2"], ["2"]))
"""


def test_workers_that_cannot_start_raise_an_error_that_says_why():
    run = subprocess.run(
        [sys.executable, "-c", _CALLER_WHOSE_GRADER_CANNOT_START], capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0 and run.stdout == ""
    [error] = [line for line in run.stderr.splitlines() if line.startswith("RuntimeError")]
    assert "the grading process could not start" in error
    assert "LookupError: unknown encoding: no-such-codec" in run.stderr.split(error)[1]
