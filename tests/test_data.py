"""The recipes' data files: each Hub dataset's rows (tiny fixtures in its real column layout) become bare questions
and reference answers; the training set is deduplicated and kept apart from the evaluation sets. Nothing here
downloads: ``build`` takes a loader, and the CLI test replaces ``datasets.load_dataset``."""

import json

import datasets
import pytest

from meds_patch.__main__ import main
from meds_patch.tools.data import (
    EVAL_SOURCES,
    TRAIN_SET,
    TRAIN_SOURCES,
    answer_text,
    build,
    evaluation_rows,
    from_dapo,
    training_rows,
)

DAPO, MATH = TRAIN_SOURCES


def dapo_row(question, answer, index="b426d104-244d-4831-a2c4-cd756b61700a"):
    """A row of BytedTsinghua-SIA/DAPO-Math-17k, its question inside DAPO's instruction."""
    content = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        f"{question}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": content, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def math_row(problem, level, solution, subject="Algebra"):
    """A row of DigitalLearningGmbH/MATH-lighteval."""
    return {"problem": problem, "level": level, "solution": solution, "type": subject}


def olympiad_row(question, final_answer, context=None):
    """A row of math-ai/olympiadbench (the image columns are empty for the text-only questions)."""
    return {
        "id": 2231,
        "question": question,
        "solution": ["A short argument."],
        "final_answer": final_answer,
        "context": context,
        "image_1": None,
        "modality": "Text-only",
        "difficulty": "Competition",
        "is_multiple_answer": len(final_answer) > 1,
        "unit": None,
        "answer_type": "Numerical",
        "error": None,
        "question_type": "Open-ended",
        "subfield": "Combinatorics",
        "subject": "Math",
        "language": "English",
    }


EVAL_FIXTURES = {  # set: (Hub rows in the dataset's layout, the rows the file must hold)
    "aime24": (
        [
            {
                "id": 60,
                "problem": "Find the number of  ways.",
                "solution": "So \\boxed{204}.",
                "answer": "204",
                "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
                "year": "2024",
            }
        ],
        [{"problem": "Find the number of  ways.", "answer": "204"}],
    ),
    "aime25": (
        [{"problem": "Find the sum of all bases $b>9$.", "answer": "70", "id": "0"}],
        [{"problem": "Find the sum of all bases $b>9$.", "answer": "70"}],
    ),
    "amc23": (
        [{"id": 0, "question": "How many miles apart?", "answer": 27.0, "url": "https://example.org/amc"}],
        [{"problem": "How many miles apart?", "answer": "27"}],
    ),
    "math500": (
        [
            {
                "problem": "Convert $(0,3)$ to polar coordinates.",
                "solution": "We get \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.",
                "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                "subject": "Precalculus",
                "level": 2,
                "unique_id": "test/precalculus/807.json",
            }
        ],
        [{"problem": "Convert $(0,3)$ to polar coordinates.", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"}],
    ),
    "minerva": (
        [{"question": "Find the luminosity in erg/s.", "answer": "7.5e39"}],
        [{"problem": "Find the luminosity in erg/s.", "answer": "7.5e39"}],
    ),
    "olympiadbench": (
        [olympiad_row("Find the smallest $n$.", ["$2^{1009}$"])],
        [{"problem": "Find the smallest $n$.", "answer": "2^{1009}"}],
    ),
}


def test_a_dapo_row_becomes_the_bare_question_and_its_ground_truth():
    rows = datasets.Dataset.from_list([dapo_row("In triangle $ABC$, find $AB$.\nGive $m+n$.", "34")])
    assert [from_dapo(row) for row in rows] == [
        {"problem": "In triangle $ABC$, find $AB$.\nGive $m+n$.", "answer": "34"}
    ]


def test_a_dapo_prompt_without_the_instruction_is_an_error():
    row = dapo_row("What is $1+1$?", "2")
    row["prompt"][0]["content"] = "What is $1+1$?"
    with pytest.raises(ValueError, match="DAPO prompt without DAPO's instruction"):
        from_dapo(row)


def test_math_keeps_levels_3_to_5_and_counts_the_others():
    levels = ["Level 1", "Level 2", "Level ?", "Level 3", "Level 4", "Level 5"]
    rows = datasets.Dataset.from_list(
        [math_row(f"Question {i}?", lvl, f"\\boxed{{{i}}}") for i, lvl in enumerate(levels)]
    )
    kept, counts = training_rows([(MATH, rows)], {})
    assert kept == [
        {"problem": "Question 3?", "answer": "3"},
        {"problem": "Question 4?", "answer": "4"},
        {"problem": "Question 5?", "answer": "5"},
    ]
    assert counts[MATH.label]["other level"] == 3 and counts[MATH.label]["kept"] == 3


def test_the_math_answer_is_the_last_box_with_its_nested_braces():
    solution = "First \\boxed{2} is wrong; in fact $x = \\boxed{\\frac{\\sqrt{3}}{2}}$."
    kept, _ = training_rows([(MATH, [math_row("Find $x$.", "Level 4", solution)])], {})
    assert kept == [{"problem": "Find $x$.", "answer": "\\frac{\\sqrt{3}}{2}"}]


def test_training_rows_without_an_answer_are_dropped_and_counted():
    dapo = [dapo_row("Has an answer?", "5"), dapo_row("Blank ground truth?", " ")]
    math = [math_row("No box here?", "Level 3", "The answer is 7."), math_row("Open box?", "Level 3", "\\boxed{7")]
    kept, counts = training_rows([(DAPO, dapo), (MATH, math)], {})
    assert kept == [{"problem": "Has an answer?", "answer": "5"}]
    assert counts[DAPO.label]["without answer"] == 1 and counts[MATH.label]["without answer"] == 2


def test_a_question_repeated_within_and_across_sources_is_kept_once_with_its_first_answer():
    dapo = [dapo_row("Find  $x$ if\n$2x = 6$.", "3")] * 3 + [dapo_row("Another question.", "1")]
    math = [math_row(" Find $x$ if $2x = 6$. ", "Level 3", "\\boxed{x = 3}")]
    kept, counts = training_rows([(DAPO, dapo), (MATH, math)], {})
    assert kept == [
        {"problem": "Find  $x$ if\n$2x = 6$.", "answer": "3"},
        {"problem": "Another question.", "answer": "1"},
    ]
    assert counts[DAPO.label]["duplicate"] == 2 and counts[MATH.label]["duplicate"] == 1


def test_training_questions_in_an_evaluation_set_are_dropped_and_counted_per_set():
    eval_sets = {
        "math500": [{"problem": "Find $y$.", "answer": "1"}],
        "aime24": [{"problem": "Count it.", "answer": "2"}],
    }
    dapo = [dapo_row("Count   it.", "2"), dapo_row("Keep me.", "3")]
    math = [math_row("Find $y$.", "Level 5", "\\boxed{1}")]
    kept, counts = training_rows([(DAPO, dapo), (MATH, math)], eval_sets)
    assert kept == [{"problem": "Keep me.", "answer": "3"}]
    assert counts[DAPO.label]["in aime24"] == 1 and counts[MATH.label]["in math500"] == 1


@pytest.mark.parametrize("name", sorted(EVAL_FIXTURES))
def test_each_evaluation_dataset_becomes_question_and_answer_rows(name):
    hub_rows, expected = EVAL_FIXTURES[name]
    kept, _ = evaluation_rows(EVAL_SOURCES[name], datasets.Dataset.from_list(hub_rows))
    assert kept == expected


def test_olympiadbench_puts_the_context_first_and_joins_several_answers():
    rows = [
        olympiad_row("Find all $x$.", ["$x=1$, $x=2$"], context="Let $f(x) = x^2$."),
        olympiad_row("Find $a$ and $b$.", ["$3$", "$4$"]),
        olympiad_row("What does it cost?", ["\\$5"]),
    ]
    kept, _ = evaluation_rows(EVAL_SOURCES["olympiadbench"], datasets.Dataset.from_list(rows))
    assert kept == [
        {"problem": "Let $f(x) = x^2$.\n\nFind all $x$.", "answer": "x=1, x=2"},
        {"problem": "Find $a$ and $b$.", "answer": "3, 4"},
        {"problem": "What does it cost?", "answer": "\\$5"},
    ]


def test_evaluation_sets_keep_duplicates_and_drop_rows_without_an_answer():
    rows = [
        {"problem": "Same.", "answer": "1"},
        {"problem": "Same.", "answer": "1"},
        {"problem": "None.", "answer": ""},
    ]
    kept, counts = evaluation_rows(EVAL_SOURCES["aime25"], rows)
    assert kept == [{"problem": "Same.", "answer": "1"}] * 2
    assert counts == {"read": 3, "kept": 2, "without answer": 1}


@pytest.mark.parametrize("value, text", [(27.0, "27"), (0.5, "0.5"), (3, "3"), (" 7 ", "7"), ("", None), (None, None)])
def test_an_answer_is_stripped_text_and_integral_numbers_lose_their_point(value, text):
    assert answer_text(value) == text


def test_an_answer_of_another_type_is_an_error():
    with pytest.raises(TypeError, match="an answer must be a string or a number, got list"):
        answer_text(["1"])


HUB_FIXTURES = {  # (Hub name, split) -> rows; a wrong name or split is a KeyError
    (DAPO.hub, "train"): [dapo_row("DAPO question?", "10"), dapo_row("DAPO question?", "10")],
    (MATH.hub, "train"): [
        math_row("MATH question?", "Level 3", "\\boxed{11}"),
        math_row("Easy MATH question?", "Level 1", "\\boxed{12}"),
        math_row("Find the number of  ways.", "Level 5", "\\boxed{204}"),  # also in aime24
    ],
    **{(EVAL_SOURCES[name].hub, EVAL_SOURCES[name].split): rows for name, (rows, _) in EVAL_FIXTURES.items()},
}


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_build_writes_every_file_with_string_problem_and_answer_fields(tmp_path):
    build(str(tmp_path), load=lambda source: HUB_FIXTURES[(source.hub, source.split)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{name}.jsonl" for name in [TRAIN_SET, *EVAL_FIXTURES]
    )
    assert read_jsonl(tmp_path / f"{TRAIN_SET}.jsonl") == [
        {"problem": "DAPO question?", "answer": "10"},
        {"problem": "MATH question?", "answer": "11"},
    ]
    for name, (_, expected) in EVAL_FIXTURES.items():
        assert read_jsonl(tmp_path / f"{name}.jsonl") == [dict(row, datasource=name) for row in expected]


def test_building_the_training_set_alone_still_keeps_evaluation_questions_out(tmp_path):
    summary = build(str(tmp_path), [TRAIN_SET], load=lambda source: HUB_FIXTURES[(source.hub, source.split)])
    assert [p.name for p in tmp_path.iterdir()] == [f"{TRAIN_SET}.jsonl"]
    assert {"problem": "Find the number of  ways.", "answer": "204"} not in read_jsonl(tmp_path / f"{TRAIN_SET}.jsonl")
    assert "1 in aime24" in summary


def test_build_rejects_an_unknown_set(tmp_path):
    with pytest.raises(ValueError, match="unknown or no sets \\['gsm8k'\\]"):
        build(str(tmp_path), ["gsm8k"], load=lambda source: [])


def test_the_data_command_loads_each_dataset_by_hub_name_and_split_and_prints_a_summary(tmp_path, monkeypatch, capsys):
    def fake_load_dataset(path, name=None, split=None, **kwargs):
        return datasets.Dataset.from_list(HUB_FIXTURES[(path, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert main(["data", "--out", str(tmp_path), "--sets", TRAIN_SET, "amc23"]) == 0
    assert read_jsonl(tmp_path / "amc23.jsonl") == [
        {"problem": "How many miles apart?", "answer": "27", "datasource": "amc23"}
    ]
    out = capsys.readouterr().out
    assert f"{TRAIN_SET}.jsonl: 2 rows" in out
    assert "DAPO-Math-17K (BytedTsinghua-SIA/DAPO-Math-17k, train): 2 read, 1 kept" in out
