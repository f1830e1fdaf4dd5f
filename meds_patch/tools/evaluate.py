"""``python -m meds_patch eval``: pass@1 and pass@k of checkpoints on the math benchmarks, as in the paper's Table 1.

Every model answers every question of every set n times with vLLM offline; the last ``\\boxed{}`` of each
response is graded against the reference by math-verify in the project's killable workers
(``tools/math_reward.py``): a check that runs past ``MEDS_REWARD_TIMEOUT`` scores 0 and is counted as a timeout.
Defaults are the authors' evaluation settings (LIMO's ``eval.sh``): n 128, temperature 1.0, top-p 1.0, 8192 new
tokens, seed 0. Per set and averaged over the sets: pass@1 (the mean correctness of the n samples) and unbiased
pass@k for k = 1, 2, 4, ..., n; each model after the first, its difference from the first (the baseline) with a
paired bootstrap interval over questions.

Written to the output folder: ``results.md``, ``results.json`` (per question: every sample's correctness, final
answer and length) and ``pass_at_k_<set>.png``. ``samples/<model>/<set>.jsonl`` keeps each question once it is
graded, so the same command run again continues where a killed one stopped.
"""

import glob
import hashlib
import json
import os
import string
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from meds_patch.core.answers import last_boxed_answer
from meds_patch.core.metrics import pass_at_k
from meds_patch.tools.data import EVAL_SETS

# The recipes' prompt (PROMPT_TEMPLATE in examples/scripts/meds_recipe_common.sh, which tests/test_evaluate.py
# compares with this): Qwen-Math's chat turn, filled by str.format, so its literal \boxed{} is written \boxed{{}}.
QWEN_MATH_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
BOOTSTRAP_RESAMPLES = 1000
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


class InputError(ValueError):
    """Bad input, found before any model loads (the command prints it and exits with code 2)."""


def read_sets(data_dir: str, sets: Sequence[str]) -> tuple:
    """({set: rows}, problems): each set is ``<data_dir>/<set>.jsonl``, rows with a ``problem`` and an ``answer``."""
    if not os.path.isdir(data_dir):
        return {}, [f"--data {data_dir}: no such folder (`python -m meds_patch data --out DIR` writes the sets)"]
    rows, problems = {}, []
    for name in sets:
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.isfile(path):
            there = sorted(os.path.basename(p)[: -len(".jsonl")] for p in glob.glob(os.path.join(data_dir, "*.jsonl")))
            problems.append(f"set {name!r}: no file {path} (sets in {data_dir}: {', '.join(there) or 'none'})")
            continue
        rows[name] = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                problem, answer = (row.get("problem"), row.get("answer")) if isinstance(row, dict) else (None, None)
                if not (isinstance(problem, str) and problem.strip() and answer is not None and str(answer).strip()):
                    problems.append(f"{path}, line {number}: not a JSON row with a `problem` and an `answer`")
                    break
                rows[name].append({"problem": problem, "answer": str(answer)})
            else:
                if not rows[name]:
                    problems.append(f"{path}: no questions")
    return rows, problems


def model_problems(model: str) -> List[str]:
    """What keeps vLLM from loading a local Hugging Face model folder, found without loading it."""
    if not os.path.isdir(model):
        return [f"--model {model}: not a folder (eval reads local Hugging Face model folders)"]
    missing = []
    if not os.path.isfile(os.path.join(model, "config.json")):
        missing.append("no config.json")
    if not any(glob.glob(os.path.join(model, pattern)) for pattern in WEIGHT_FILES):
        missing.append(f"no weights ({' or '.join(WEIGHT_FILES)})")
    # A checkpoint still being written or copied has its index before all its shards.
    for index in glob.glob(os.path.join(model, "*.index.json")):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
        absent = [shard for shard in shards if not os.path.isfile(os.path.join(model, shard))]
        if absent:
            missing.append(f"{os.path.basename(index)} names shards that are not there: {', '.join(absent)}")
    if not any(os.path.isfile(os.path.join(model, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("no tokenizer (tokenizer.json or tokenizer_config.json)")
    return [f"--model {model}: {'; '.join(missing)}"] if missing else []


def weights_fingerprint(model: str) -> List[list]:
    """Name, size and modification time of each weight file: a model saved again in the same folder (a demo
    resumed, say) does not continue an evaluation of the old weights."""
    files = sorted(path for pattern in WEIGHT_FILES for path in glob.glob(os.path.join(model, pattern)))
    return [[os.path.basename(path), os.path.getsize(path), os.stat(path).st_mtime_ns] for path in files]


def model_labels(models: Sequence[str]) -> List[str]:
    """Each model's folder name or, where two share one (``run-a/hf`` and ``run-b/hf``), its path from the folder
    all of them are in."""
    paths = [os.path.realpath(model) for model in models]
    names = [os.path.basename(path) for path in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.relpath(path, os.path.commonpath(paths)) for path in paths]


def read_saved(path: str, header: dict, rows: List[dict]) -> Dict[int, dict]:
    """The questions a samples file holds, by index ({} for a new file). A killed run may leave its last line cut
    short: the file is cut back to its last whole line."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as fh:
        data = fh.read()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(whole))
    lines = whole.decode("utf-8").splitlines()
    if not lines:
        return {}
    saved_header = json.loads(lines[0])
    changed = [
        f"{key} {saved_header.get(key)!r} there, {value!r} now"
        for key, value in header.items()
        if saved_header.get(key) != value
    ]
    if changed:
        raise InputError(f"{path} holds samples made otherwise ({'; '.join(changed)}): use another --out")
    saved = {}
    for line in lines[1:]:
        record = json.loads(line)
        row = rows[record["index"]] if record["index"] < len(rows) else {}
        if (row.get("problem"), row.get("answer")) != (record["problem"], record["answer"]):
            raise InputError(f"{path}: question {record['index']} is not the data file's any more: use another --out")
        saved[record["index"]] = record
    return saved


def generate(model: str, work: List[tuple], settings: dict, tensor_parallel_size: int, label: str, total: int) -> dict:
    """Sample, grade and save each question of ``work`` ((set, index, row, samples file), in order) with one vLLM
    engine; a question is appended to its samples file once its n samples are graded. Returns the records by
    (set, index), the engine's times and the tokens generated. ``total``: the model's questions, for the progress bar.
    """
    import torch
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from meds_patch.tools.math_reward import judge

    started = time.monotonic()
    # On CPU: eager mode, as the CPU harness runs vLLM, and no chunked prefill: after a partial prefill vLLM 0.29
    # rewinds the request's seeded generator, which a CPU generator cannot do ("CPU Generator does not use
    # offset"). bfloat16 is the dtype the authors' checkpoints are saved in.
    gpu = torch.cuda.is_available()
    llm = LLM(
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        dtype="bfloat16",
        seed=settings["seed"],
        enforce_eager=not gpu,
        enable_chunked_prefill=gpu,
    )
    loaded = time.monotonic()
    # Each question gets a seed of its own (its samples get seed + 0 .. n - 1 from vLLM): its samples do not
    # depend on which questions share the engine's batches, so a resumed or repeated run draws the same ones.
    params = [
        SamplingParams(
            n=settings["n"], temperature=settings["temperature"], top_p=settings["top_p"],
            max_tokens=settings["max_tokens"],
            seed=int.from_bytes(hashlib.sha256(f"{settings['seed']}/{name}/{index}".encode()).digest()[:4], "little"),
        )
        for name, index, _, _ in work
    ]  # fmt: skip
    prompts = [settings["template"].format(row["problem"]) for _, _, row, _ in work]
    # enqueue returns vLLM's internal request ids, "<id>-<8 random characters>"; outputs carry "<id>".
    ids = llm.enqueue(prompts, params, use_tqdm=False)
    questions = {request_id.split("-")[0]: question for request_id, question in zip(ids, work)}
    records, tokens = {}, 0
    # Started after the engine: its time left counts generation only.
    progress = tqdm(total=total, initial=total - len(work), desc=f"eval {label}", unit="question")
    try:
        while llm.llm_engine.has_unfinished_requests():
            for output in llm.llm_engine.step():
                if not output.finished:
                    continue
                name, index, row, path = questions[output.request_id]
                answers = [last_boxed_answer(sample.text) for sample in output.outputs]
                correct, timed_out = judge(answers, [row["answer"]] * len(answers))
                record = {
                    "index": index, "problem": row["problem"], "answer": row["answer"], "correct": correct,
                    "answers": answers, "timed_out": timed_out,
                    "tokens": [len(sample.token_ids) for sample in output.outputs],
                    "truncated": [sample.finish_reason == "length" for sample in output.outputs],
                }  # fmt: skip
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                records[name, index] = record
                tokens += sum(record["tokens"])
                progress.update()
    finally:
        progress.close()
        llm.llm_engine.engine_core.shutdown()
    done = time.monotonic()
    return {"records": records, "load_s": loaded - started, "generate_s": done - loaded, "tokens": tokens}


def ks_up_to(n: int) -> List[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length())]
    return ks if ks[-1] == n else ks + [n]


def bootstrap_interval(differences: List[np.ndarray], seed: int) -> np.ndarray:
    """The 95% percentile interval, (2, k values), of the mean over sets of each set's mean per-question difference,
    questions resampled with replacement within each set (paired: both models keep the same questions)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((BOOTSTRAP_RESAMPLES, differences[0].shape[1]))
    for d in differences:
        picks = rng.integers(len(d), size=(BOOTSTRAP_RESAMPLES, len(d)))
        means += d[picks].mean(axis=1) / len(differences)
    return np.percentile(means, [2.5, 97.5], axis=0)


def summarise(records: Dict[tuple, List[dict]], models: Sequence[str], sets: Sequence[str], settings: dict) -> dict:
    """What results.json holds: per model, set and on average, pass@k and the samples' counts; per model after the
    first, its difference from the first. ``records[model, set]``: the set's questions in order."""
    ks = ks_up_to(settings["n"])
    # (questions, ks): each question's unbiased pass@k from its own samples.
    per_question = {
        key: np.array([[pass_at_k(len(r["correct"]), sum(r["correct"]), k) for k in ks] for r in questions])
        for key, questions in records.items()
    }
    results = {"settings": settings, "ks": ks, "models": []}
    for model, label in zip(models, model_labels(models)):
        entry = {"label": label, "path": os.path.realpath(model), "sets": {}}
        for name in sets:
            questions = records[model, name]
            samples = sum(len(r["correct"]) for r in questions)
            entry["sets"][name] = {
                "pass@k": dict(zip(map(str, ks), per_question[model, name].mean(axis=0).tolist())),
                "samples": samples,
                "timeouts": sum(sum(r["timed_out"]) for r in questions),
                "no_box": sum(a is None for r in questions for a in r["answers"]) / samples,
                "truncated": sum(sum(r["truncated"]) for r in questions) / samples,
                "mean_tokens": sum(sum(r["tokens"]) for r in questions) / samples,
                "questions": questions,
            }
        average = np.mean([per_question[model, name].mean(axis=0) for name in sets], axis=0)
        entry["average"] = dict(zip(map(str, ks), average.tolist()))
        if model != models[0]:
            entry["difference"] = {}
            for scope in [*sets, "average"]:
                scoped = sets if scope == "average" else [scope]
                d = [per_question[model, s] - per_question[models[0], s] for s in scoped]
                mean = np.mean([x.mean(axis=0) for x in d], axis=0)
                low, high = bootstrap_interval(d, settings["seed"])
                entry["difference"][scope] = {
                    str(k): {"mean": float(m), "low": float(lo), "high": float(hi)}
                    for k, m, lo, hi in zip(ks, mean, low, high)
                }
        results["models"].append(entry)
    return results


def evaluate(
    models: Sequence[str],
    data_dir: str,
    out: str,
    sets: Sequence[str] = EVAL_SETS,
    template: str = QWEN_MATH_TEMPLATE,
    n: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = 8192,
    seed: int = 0,
    tensor_parallel_size: int = 1,
) -> str:
    """Evaluate ``models`` (the first is the baseline) on ``sets``; write the results to ``out`` and return their
    Markdown. Raises InputError, before any model loads, for a missing or malformed input."""
    sets = list(dict.fromkeys(sets))
    settings = dict(template=template, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    rows, problems = read_sets(data_dir, sets)
    for model in models:
        problems += model_problems(model)
    if len({os.path.realpath(model) for model in models}) < len(models):
        problems.append("--model: a folder is given twice")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:  # a single { or }
        fields = [str(error)]
    if fields != [""]:
        problems.append(f"--template needs one {{}} for the question and {{{{ }}}} for literal braces: {template!r}")
    if min(n, max_tokens, tensor_parallel_size) < 1 or temperature < 0 or not 0 < top_p <= 1:
        problems.append("--n, --max-tokens, --tensor-parallel-size must be >= 1, --temperature >= 0, 0 < --top-p <= 1")
    if problems:
        raise InputError("\n  ".join([f"{len(problems)} problem(s), nothing was run:", *problems]))

    # What each model has saved and what it has left; samples made otherwise are an InputError too.
    saved, work, headers = {}, {}, {}
    for model in models:
        path = os.path.realpath(model)
        key = hashlib.sha256(path.encode()).hexdigest()[:8]
        folder = os.path.join(out, "samples", f"{os.path.basename(path)}-{key}")
        work[model] = []
        for name in sets:
            samples = os.path.join(folder, f"{name}.jsonl")
            headers[samples] = {"model": path, "weights": weights_fingerprint(model), "set": name, **settings}
            saved[model, name] = read_saved(samples, headers[samples], rows[name])
            work[model] += [(name, i, row, samples) for i, row in enumerate(rows[name]) if i not in saved[model, name]]
    for samples, header in headers.items():
        if not os.path.exists(samples) or os.path.getsize(samples) == 0:
            os.makedirs(os.path.dirname(samples), exist_ok=True)
            with open(samples, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(header, ensure_ascii=False) + "\n")

    timing, total = {}, sum(len(r) for r in rows.values())
    for model, label in zip(models, model_labels(models)):
        print(
            f"eval: {label}: {total - len(work[model])} of {total} questions saved before, "
            f"{len(work[model])} to generate",
            file=sys.stderr,
        )
        if not work[model]:
            continue
        run = generate(model, work[model], settings, tensor_parallel_size, label, total)
        for (name, index), record in run.pop("records").items():
            saved[model, name][index] = record
        timing[label] = dict(run, questions=len(work[model]))
        print(
            f"eval: {label}: {len(work[model])} questions in {run['generate_s']:.1f} s after a "
            f"{run['load_s']:.1f} s engine start ({run['tokens'] / run['generate_s']:.0f} tokens/s)",
            file=sys.stderr,
        )

    records = {(m, s): [saved[m, s][i] for i in range(len(rows[s]))] for m in models for s in sets}
    results = dict(summarise(records, models, sets, settings), timing=timing)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, ensure_ascii=False, indent=1)
    plot_pass_at_k(results, sets, out)
    markdown = results_markdown(results, sets)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)
    return markdown


def plot_pass_at_k(results: dict, sets: Sequence[str], out: str) -> None:
    """``pass_at_k_<set>.png`` per set and ``pass_at_k_average.png``: pass@k against k, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["ks"]
    for scope in [*sets, "average"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for entry in results["models"]:
            values = entry["average"] if scope == "average" else entry["sets"][scope]["pass@k"]
            ax.plot(ks, [values[str(k)] for k in ks], marker="o", label=entry["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_title(f"{'average over the sets' if scope == 'average' else scope} (n = {results['settings']['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(os.path.join(out, f"pass_at_k_{scope}.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)


def results_markdown(results: dict, sets: Sequence[str]) -> str:
    s, ks, entries = results["settings"], results["ks"], results["models"]
    timeouts = sum(e["sets"][name]["timeouts"] for e in entries for name in sets)
    samples = sum(e["sets"][name]["samples"] for e in entries for name in sets)
    lines = [
        "# Offline evaluation",
        "",
        f"n = {s['n']} samples a question, temperature {s['temperature']}, top-p {s['top_p']}, at most "
        f"{s['max_tokens']} new tokens, seed {s['seed']}. pass@1 is the mean correctness of the n samples, pass@k "
        "the unbiased estimate (Chen et al., 2021), both averaged over the questions; the average is the unweighted "
        "mean over the sets. A difference is from the baseline (the first model): mean [95% interval, "
        f"{BOOTSTRAP_RESAMPLES} bootstrap resamples of the questions, seed {s['seed']}].",
        "",
        f"Grading timeouts (scored 0): {timeouts} of {samples} answers.",
        "",
        *[f"- `{e['label']}`{' (baseline)' if i == 0 else ''}: `{e['path']}`" for i, e in enumerate(entries)],
    ]
    sizes = {name: len(entries[0]["sets"][name]["questions"]) for name in sets}
    for scope in ["average", *sets]:
        title = f"Average over {len(sets)} sets" if scope == "average" else f"{scope} ({sizes[scope]} questions)"
        lines += ["", f"## {title}", "", "| model | " + " | ".join(f"pass@{k}" for k in ks) + " |"]
        lines.append("|---" * (len(ks) + 1) + "|")
        for e in entries:
            values = e["average"] if scope == "average" else e["sets"][scope]["pass@k"]
            lines.append(f"| {e['label']} | " + " | ".join(f"{values[str(k)]:.3f}" for k in ks) + " |")
        for e in entries[1:]:
            d = e["difference"][scope]
            cells = [f"{d[str(k)]['mean']:+.3f} [{d[str(k)]['low']:+.3f}, {d[str(k)]['high']:+.3f}]" for k in ks]
            lines.append(f"| {e['label']} − {entries[0]['label']} | " + " | ".join(cells) + " |")
        lines += ["", f"![pass@k, {scope}](pass_at_k_{scope}.png)"]
    lines += [
        "",
        "## Samples",
        "",
        "| model | set | samples | no `\\boxed{}` | cut at max tokens | grading timeouts | mean tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        for name in sets:
            r = e["sets"][name]
            lines.append(
                f"| {e['label']} | {name} | {r['samples']} | {r['no_box']:.3f} | {r['truncated']:.3f} | "
                f"{r['timeouts']} | {r['mean_tokens']:.1f} |"
            )
    return "\n".join(lines) + "\n"
