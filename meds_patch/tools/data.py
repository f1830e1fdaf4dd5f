"""``python -m meds_patch data``: the training and evaluation JSONL files the recipes read, built from the Hub.

Every file holds one JSON object per line with two string fields, ``problem`` (the bare question, no
instruction: the recipes add the Qwen-Math prompt) and ``answer`` (the reference answer; the reward function
reads it as the content of a ``\\boxed{}``); evaluation rows add ``datasource``, the set's name. Files, in one
folder (default ``~/data``):

    dapo17k_math_l3to5.jsonl   training: DAPO-Math-17K + MATH levels 3-5 (train split), deduplicated
    aime24.jsonl  aime25.jsonl  amc23.jsonl  math500.jsonl  minerva.jsonl  olympiadbench.jsonl   evaluation

Sources and conversions. The column layouts are taken from the datasets' cards and from public code that loads
them, not from a download (none was possible where this was written): the tests' fixtures copy them, and a
dataset whose layout has changed fails with a KeyError naming the missing column.

    file / part        Hub dataset                          split  question                 answer
    DAPO-Math-17K      BytedTsinghua-SIA/DAPO-Math-17k      train  prompt[0].content,       reward_model.ground_truth
                                                                   instruction removed
    MATH levels 3-5    DigitalLearningGmbH/MATH-lighteval   train  problem (level column    last \\boxed{} of solution
                                                                   "Level 3".."Level 5")
    aime24             HuggingFaceH4/aime_2024              train  problem                  answer
    aime25             math-ai/aime25                       test   problem                  answer
    amc23              math-ai/amc23                        test   question                 answer (a number)
    math500            HuggingFaceH4/MATH-500               test   problem                  answer
    minerva            math-ai/minervamath                  test   question                 answer
    olympiadbench      math-ai/olympiadbench                test   context + question       final_answer (a list)

Why these: DAPO's own release and the MATH train split in one parquet config (EleutherAI/hendrycks_math needs
seven subject configs); the evaluation sets are the copies most RL-for-math papers load, one split each, with a
ready answer column. OlympiadBench is the 675 English, text-only competition questions; its list of answers is
joined with ", " (one element for all but multiple-answer questions), ``$`` delimiters removed, units dropped.

Training set (MEDS paper, arXiv:2604.11297, trains on "DAPO-Math-17K plus MATH levels 3-5, deduplicated"):
DAPO-Math-17K repeats each of its ~17.9k questions about 100 times in ~1.79M rows, each wrapped in DAPO's
"Solve the following math problem step by step. ... Answer: $Answer ..." instruction, which is removed (a row
without it is an error). Rows are taken DAPO first, then MATH; a row is dropped, and counted, when it has no
answer, when its question (whitespace collapsed) is one of an evaluation set's, or when an earlier row has the
same question. MATH-500 comes from MATH's test split, so the train split is used; overlap is still checked.
Evaluation sets keep every row that has an answer, duplicates included.
"""

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from meds_patch.core.answers import last_boxed_answer

TRAIN_SET = "dapo17k_math_l3to5"
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
ALL_SETS = (TRAIN_SET,) + EVAL_SETS

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
MATH_LEVELS = ("Level 3", "Level 4", "Level 5")
UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def normalise_question(text: str) -> str:
    """The key two questions are compared by: whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def answer_text(value) -> Optional[str]:
    """A reference answer as a string: text stripped, integral numbers without ``.0``; None when missing or blank."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"an answer must be a string or a number, got {type(value).__name__}: {value!r}")
    return str(value).strip() or None


def from_dapo(row: dict) -> dict:
    content = row["prompt"][0]["content"]
    if not (content.startswith(DAPO_PREFIX) and content.endswith(DAPO_SUFFIX)):
        raise ValueError(f"a DAPO prompt without DAPO's instruction around the question: {content[:100]!r}")
    question = content[len(DAPO_PREFIX) : len(content) - len(DAPO_SUFFIX)]
    return {"problem": question.strip(), "answer": answer_text(row["reward_model"]["ground_truth"])}


def from_math(row: dict) -> Optional[dict]:
    """None for a question outside levels 3-5 (MATH also has "Level ?" for a few unrated ones)."""
    if row["level"] not in MATH_LEVELS:
        return None
    return {"problem": row["problem"].strip(), "answer": answer_text(last_boxed_answer(row["solution"]))}


def from_columns(question: str, answer: str) -> Callable[[dict], dict]:
    return lambda row: {"problem": row[question].strip(), "answer": answer_text(row[answer])}


def from_olympiadbench(row: dict) -> dict:
    # Questions of a series share a context the question refers to, so it goes first.
    question = row["question"].strip()
    if row.get("context"):
        question = row["context"].strip() + "\n\n" + question
    # Answers come as ["$2^{1009}$"]: unescaped $ delimiters are dropped, an escaped \$ (a dollar sign) stays.
    answers = [UNESCAPED_DOLLAR.sub("", answer_text(a) or "").strip() for a in row["final_answer"] or []]
    return {"problem": question, "answer": ", ".join(a for a in answers if a) or None}


@dataclass(frozen=True)
class Source:
    label: str
    hub: str
    split: str
    convert: Callable[[dict], Optional[dict]]  # one Hub row -> {"problem", "answer"}, None if not in the set


TRAIN_SOURCES = (
    Source("DAPO-Math-17K", "BytedTsinghua-SIA/DAPO-Math-17k", "train", from_dapo),
    Source("MATH levels 3-5", "DigitalLearningGmbH/MATH-lighteval", "train", from_math),
)
EVAL_SOURCES = {
    "aime24": Source("AIME 2024", "HuggingFaceH4/aime_2024", "train", from_columns("problem", "answer")),
    "aime25": Source("AIME 2025", "math-ai/aime25", "test", from_columns("problem", "answer")),
    "amc23": Source("AMC 2023", "math-ai/amc23", "test", from_columns("question", "answer")),
    "math500": Source("MATH-500", "HuggingFaceH4/MATH-500", "test", from_columns("problem", "answer")),
    "minerva": Source("Minerva Math", "math-ai/minervamath", "test", from_columns("question", "answer")),
    "olympiadbench": Source("OlympiadBench", "math-ai/olympiadbench", "test", from_olympiadbench),
}


def evaluation_rows(source: Source, rows: Iterable[dict]) -> tuple:
    """(rows with an answer, counts): an evaluation set keeps its duplicates, as the benchmark has them."""
    kept, counts = [], Counter({"read": 0, "kept": 0, "without answer": 0})
    for row in rows:
        counts["read"] += 1
        item = source.convert(row)
        if not item["answer"] or not item["problem"]:
            counts["without answer"] += 1
            continue
        counts["kept"] += 1
        kept.append(item)
    return kept, counts


def training_rows(parts: Iterable[tuple], eval_sets: dict) -> tuple:
    """(deduplicated rows, counts per source label) from ``(source, rows)`` pairs in order; ``eval_sets`` maps a
    set name to its rows, whose questions are kept out of training."""
    eval_owner = {}
    for name, rows in eval_sets.items():
        for row in rows:
            eval_owner.setdefault(normalise_question(row["problem"]), name)
    seen, kept, counts = set(), [], {}
    for source, rows in parts:
        count = counts[source.label] = Counter(
            {"read": 0, "kept": 0, "other level": 0, "without answer": 0, "duplicate": 0}
        )
        for row in rows:
            count["read"] += 1
            item = source.convert(row)
            if item is None:
                count["other level"] += 1
                continue
            if not item["answer"] or not item["problem"]:
                count["without answer"] += 1
                continue
            key = normalise_question(item["problem"])
            if key in eval_owner:
                count[f"in {eval_owner[key]}"] += 1
            elif key in seen:
                count["duplicate"] += 1
            else:
                seen.add(key)
                count["kept"] += 1
                kept.append(item)
    return kept, counts


def write_jsonl(path: str, rows: list) -> None:
    # Written beside and renamed: a recipe never reads half a file (it counts lines for the warm-up).
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        for row in rows:
            fields = {key: row[key] for key in ("problem", "answer", "datasource") if key in row}
            fh.write(json.dumps(fields, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def dataset_rows(table) -> Iterator[dict]:
    """The rows of a ``datasets.Dataset`` as dicts, decoded a batch at a time: iterating the Dataset itself decodes
    row by row, which is several times slower on DAPO's 1.79M rows (bench/data_iteration.py)."""
    for batch in table.iter(batch_size=10_000):
        for values in zip(*batch.values()):
            yield dict(zip(batch, values))


def load_from_hub(source: Source) -> Iterator[dict]:
    import datasets

    return dataset_rows(datasets.load_dataset(source.hub, split=source.split))


def build(out_dir: str, sets: Iterable[str] = ALL_SETS, load: Callable = load_from_hub) -> str:
    """Write the chosen sets as ``<out_dir>/<set>.jsonl``; return a summary. ``load(source)`` gives a source's rows.
    Building the training set loads every evaluation set, written or not, to keep their questions out."""
    sets = list(sets)
    unknown = [name for name in sets if name not in ALL_SETS]
    if unknown or not sets:
        raise ValueError(f"unknown or no sets {unknown}: choose from {', '.join(ALL_SETS)}")
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"data in {out_dir}:"]
    eval_sets = {}
    for name in EVAL_SETS if TRAIN_SET in sets else [n for n in EVAL_SETS if n in sets]:
        source = EVAL_SOURCES[name]
        eval_sets[name], counts = evaluation_rows(source, load(source))
        if name in sets:
            # "datasource" is the field upstream groups evaluation metrics by: several files, one metric each.
            write_jsonl(
                os.path.join(out_dir, f"{name}.jsonl"), [dict(row, datasource=name) for row in eval_sets[name]]
            )
            lines.append(
                f"  {name}.jsonl: {len(eval_sets[name])} rows ({source.hub}, {source.split}; {_tally(counts)})"
            )
    if TRAIN_SET in sets:
        rows, counts = training_rows(((source, load(source)) for source in TRAIN_SOURCES), eval_sets)
        write_jsonl(os.path.join(out_dir, f"{TRAIN_SET}.jsonl"), rows)
        lines.append(f"  {TRAIN_SET}.jsonl: {len(rows)} rows")
        for source in TRAIN_SOURCES:
            lines.append(f"    {source.label} ({source.hub}, {source.split}): {_tally(counts[source.label])}")
    return "\n".join(lines)


def _tally(counts: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.items())
