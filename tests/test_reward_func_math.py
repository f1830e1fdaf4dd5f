import importlib.util
import threading
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "examples" / "reward_func_math.py"
_SPEC = importlib.util.spec_from_file_location("reward_func_math", _PATH)
reward_func_math = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reward_func_math)

PROMPT = "<|user|>Solve the problem and put the final answer in \\boxed{}.<|assistant|>"


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
