"""``python -m meds_patch report <checkpoint dir>``: what the error memory of a run holds, as Markdown and PNGs.

The report names questions by their bare text (``bare_question``), never by their hash, and counts what the
penalty counts: the stored answers of each HDBSCAN cluster and, as a group of its own, the noise points
(docs/ALGORITHM.md §3: a vote for noise is sized by the number of stored noise points).
"""

import glob
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from meds_patch.core import CHECKPOINT_KEY
from meds_patch.core.config import MEDSConfig
from meds_patch.core.memory import ErrorMemory
from meds_patch.core.penalty import penalty_term

TOP = 10  # questions in the table
PLOTTED = 8  # questions in the per-question cluster plot
GROWTH_LINES = 5  # questions drawn in the growth plot
MAX_BARS = 12  # clusters drawn per question; smaller ones are counted in a note
CLUSTER_COLOUR, NOISE_COLOUR = "tab:blue", "tab:gray"

# The last user turn of the chat templates the report can read: ChatML (Qwen), Llama 3, Gemma, DeepSeek, Phi-3 /
# Zephyr, Llama 2 / Mistral and "User: ... Assistant:". A turn cut off by the end of the stored prompt (the glue
# keeps its first 300 characters) runs to the end of the text.
USER_TURNS = (
    re.compile(r"<\|im_start\|>user\s*(.*?)(?:<\|im_end\|>|$)", re.S),
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)(?:<\|eot_id\|>|$)", re.S),
    re.compile(r"<start_of_turn>user\s*(.*?)(?:<end_of_turn>|$)", re.S),
    re.compile(r"<｜User｜>(.*?)(?:<｜Assistant｜>|$)", re.S),
    re.compile(r"<\|user\|>\s*(.*?)(?:<\|end\|>|</s>|<\|assistant\|>|$)", re.S),
    re.compile(r"\[INST\]\s*(?:<<SYS>>.*?<</SYS>>\s*)?(.*?)(?:\[/INST\]|$)", re.S),
    re.compile(r"(?:^|\n)User:\s*(.*?)(?:\nAssistant:|$)", re.S),
)
# A sentence asking for a \boxed{} answer ("Please reason step by step, and put your final answer within
# \boxed{}."): an empty box belongs to the instruction, not to a question.
BOXED_INSTRUCTION = re.compile(r"[^.?!\n]*\\boxed\{\}[^.?!\n]*[.!]?")
CUT_MARKER = re.compile(r"<(?:[|｜][^\s<>]*)?$")  # a special token cut in two by the end of the stored prompt
QUESTION_LABELS = re.compile(r"^(?:Question|Problem)\s*:\s*|\s*(?:Answer|Solution)\s*:$", re.I)


def bare_question(prompt: str) -> str:
    """The question of a templated prompt, whitespace collapsed: the last user turn of a chat template it knows,
    without sentences that ask for a ``\\boxed{}`` answer and without a leading "Question:" or a trailing
    "Answer:". A prompt in a template it does not know is kept whole (minus those sentences and labels); if
    nothing would be left, the whole text is returned. Bare text comes back unchanged."""
    # The user turn that starts last is the question the rollouts answered.
    turns = [match for pattern in USER_TURNS for match in pattern.finditer(prompt)]
    last = max(turns, key=lambda match: match.start(1)).group(1) if turns else prompt
    last = CUT_MARKER.sub("", last)
    text = " ".join(BOXED_INSTRUCTION.sub(" ", last).split())
    text = QUESTION_LABELS.sub("", text).strip()
    return text or " ".join(last.split()) or " ".join(prompt.split())


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked with an ellipsis (``textwrap.shorten`` drops whole
    words, which leaves nothing of a long formula without spaces)."""
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


@dataclass
class QuestionMemory:
    """One (question, outcome) memory as the report shows it."""

    key: str
    correct: bool
    question: str  # bare text, or a note naming the key when the checkpoint has no text for it
    clusters: np.ndarray  # stored answers per HDBSCAN cluster, largest first
    noise: int  # stored noise points
    arrivals: np.ndarray  # the memory update that stored each answer

    @property
    def stored(self) -> int:
        return int(self.clusters.sum()) + self.noise

    @property
    def largest(self) -> int:
        return int(self.clusters.max(initial=0))


def question_memories(memory: ErrorMemory, prompts: Dict[str, str]) -> List[QuestionMemory]:
    """Every memory, most stored answers first (then largest cluster, then key, so the order is stable)."""
    rows = []
    for (key, correct), labels in memory.labels.items():
        text = prompts.get(key)
        question = bare_question(text) if text else f"(question text not recorded; key {key[:12]})"
        counts = np.bincount(labels[labels >= 0])
        clusters = np.sort(counts[counts > 0])[::-1]  # hand-made states may skip a label
        noise = int((labels < 0).sum())
        rows.append(QuestionMemory(key, correct, question, clusters, noise, memory.arrivals[(key, correct)]))
    rows.sort(key=lambda r: (-r.stored, -r.largest, r.key, r.correct))
    return rows


def label(rank: int, row: QuestionMemory, width: int, target: str) -> str:
    """How plots name a memory: its rank in the report's table and its question, plus the outcome where the
    memory holds more than wrong answers. Dollar signs are escaped: matplotlib would read $...$ as math and fail
    on LaTeX it does not know."""
    outcome = "" if target == "wrong" else (" [right]" if row.correct else " [wrong]")
    return f"#{rank} {shorten(row.question, width)}{outcome}".replace("$", r"\$")


def penalty_counts(rows: List[QuestionMemory], config: MEDSConfig) -> Dict[float, dict]:
    """For each penalty value a stored answer's group gives a new answer voting for it: the group sizes n behind
    it and how many stored answers sit in clusters and in noise. Noise groups have n = their noise points, or
    n = 0 with ``noise_as_cluster`` off, as in the memory's own vote."""
    values: Dict[float, dict] = {}
    for row in rows:
        groups = [(int(n), "clusters") for n in row.clusters] + [(row.noise, "noise")] * (row.noise > 0)
        for n, kind in groups:
            size = n if kind == "clusters" or config.noise_as_cluster else 0
            p = float(penalty_term([size], config.alpha, config.penalty_cap)[0])
            entry = values.setdefault(p, {"sizes": set(), "clusters": 0, "noise": 0})
            entry["sizes"].add(size)
            entry[kind] += n
    return dict(sorted(values.items()))


def integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_clusters(rows: List[QuestionMemory], config: MEDSConfig):
    """Small multiples, one per question with the most stored answers: its clusters' sizes, largest first, and
    its noise points as a grey bar of their own."""
    import matplotlib.pyplot as plt

    shown = rows[:PLOTTED]
    ncols = 1 if len(shown) == 1 else 2
    nrows = -(-len(shown) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 2.9 * nrows + 0.9), squeeze=False)
    for rank, (row, ax) in enumerate(zip(shown, axes.flat), start=1):
        drawn = row.clusters[:MAX_BARS]
        heights = [*drawn.tolist(), row.noise]
        names = [str(i) for i in range(1, len(drawn) + 1)] + ["noise"]
        bars = ax.bar(range(len(heights)), heights, color=[CLUSTER_COLOUR] * len(drawn) + [NOISE_COLOUR])
        ax.bar_label(bars, fontsize=8)
        ax.set_xticks(range(len(heights)), names, fontsize=8)
        integer_axis(ax.yaxis)
        ax.set_ylim(0, max(heights) * 1.18 + 0.5)  # room for the count above the tallest bar
        ax.set_xlim(-0.6, max(len(heights), 5) - 0.4)  # a question with few groups keeps bars of normal width
        hidden = len(row.clusters) - len(drawn)
        xlabel = "cluster (largest first)" + (f"; {hidden} smaller not drawn" if hidden else "")
        ax.set(xlabel=xlabel, ylabel="stored answers")
        ax.set_title(textwrap.fill(label(rank, row, 110, config.target), 58), fontsize=9, loc="left")
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    noise = "a vote for noise is sized by all of them" if config.noise_as_cluster else "noise votes get size 0"
    fig.suptitle(
        f"Recurring errors of the {len(shown)} questions with the most stored answers\n"
        f"(bars: answers per HDBSCAN cluster; grey: noise points, {noise})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_penalties(rows: List[QuestionMemory], config: MEDSConfig):
    """The discrete penalty values min(alpha*ln(n+1), beta): stored answers per value, split into answers in
    clusters and noise points; each value is labelled with the group sizes n that give it."""
    import matplotlib.pyplot as plt

    values = penalty_counts(rows, config)
    names = []
    for p, entry in values.items():
        sizes = sorted(entry["sizes"])
        n = ", ".join(map(str, sizes)) if len(sizes) <= 3 else f"{sizes[0]}–{sizes[-1]}"
        names.append(f"{p:.3f}\nn={n}" + ("\n(cap β)" if p == config.penalty_cap and p > 0 else ""))
    positions = np.arange(len(values))
    in_clusters = np.array([entry["clusters"] for entry in values.values()])
    in_noise = np.array([entry["noise"] for entry in values.values()])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(values) + 2), 4.5))
    ax.bar(positions, in_clusters, color=CLUSTER_COLOUR, label="answers in clusters")
    bars = ax.bar(positions, in_noise, bottom=in_clusters, color=NOISE_COLOUR, label="noise points")
    ax.bar_label(bars, labels=[str(t) for t in in_clusters + in_noise], fontsize=8)
    ax.set_xticks(positions, names, fontsize=8, rotation=0 if len(values) <= 10 else 90)
    integer_axis(ax.yaxis)
    ax.set_ylim(0, (in_clusters + in_noise).max() * 1.15 + 0.5)
    ax.set(
        xlabel=f"penalty p = min({config.alpha:g}·ln(n+1), {config.penalty_cap:g}), n = size of the group voted for",
        ylabel="stored answers in groups that give it",
        title="Penalty a new answer gets for voting with a stored answer's group",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_growth(rows: List[QuestionMemory], updates: int, config: MEDSConfig):
    """Stored answers after each memory update (from an empty memory at step 0): the questions with the most
    stored answers, and the mean."""
    import matplotlib.pyplot as plt

    last = max(updates, *(int(r.arrivals.max(initial=0)) for r in rows), 1)
    steps = np.arange(0, last + 1)
    stored = [np.searchsorted(np.sort(r.arrivals), steps, side="right") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2 + 0.25 * min(len(rows), GROWTH_LINES)))
    # Questions often grow alike: a marker of its own keeps each line visible where they overlap.
    for rank, (row, counts, marker) in enumerate(zip(rows[:GROWTH_LINES], stored, "osD^v"), start=1):
        ax.plot(steps, counts, marker=marker, markersize=5, alpha=0.85, label=label(rank, row, 70, config.target))
    ax.plot(steps, np.mean(stored, axis=0), color="black", linestyle="--", label=f"mean over all {len(rows)} memories")
    integer_axis(ax.xaxis)
    integer_axis(ax.yaxis)
    ax.set(xlabel="training step (memory update)", ylabel="stored answers", title="Memory growth per question")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    return fig


def find_memory_state(path: str) -> tuple:
    """(state, file) of the memory saved in a checkpoint: a run's ``--ckpt.path``, its ``_actor`` folder or a tag
    folder. DeepSpeed keeps ``client_state`` inside its model-states file; mmap avoids reading the weights."""
    import torch

    for folder in (path, os.path.join(path, "_actor")):
        latest = os.path.join(folder, "latest")
        if os.path.isfile(latest):
            with open(latest) as fh:
                path = os.path.join(folder, fh.read().strip())
            break
    files = sorted(glob.glob(os.path.join(path, "*.pt")), key=lambda f: ("model_states" not in f, f))
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is impossible, read it whole
            state = torch.load(file, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and CHECKPOINT_KEY in state:
            return state[CHECKPOINT_KEY], file
    raise FileNotFoundError(f"no MEDS error memory ('{CHECKPOINT_KEY}') in the checkpoint files under {path}")


def write_report(checkpoint: str, out_dir: Optional[str] = None) -> str:
    """Write ``report.md`` and its PNGs to ``out_dir`` (default: ``<checkpoint>/meds_report``); return the .md path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state, source = find_memory_state(checkpoint)
    if state.get("kind") == "answer":
        raise ValueError(
            f"the memory in {source} counts final answers (--algo.meds.feature answer): this report draws "
            "layer-logit clusters; the counts are the state's 'answers'"
        )
    memory = ErrorMemory()
    memory.load_state_dict(dict(state))
    config = MEDSConfig(**{k: v for k, v in state.get("config", {}).items() if k in MEDSConfig.field_names()})
    rows = question_memories(memory, state.get("prompts", {}))
    if not rows:
        raise ValueError(f"the error memory in {source} is empty: nothing to report")
    out_dir = out_dir or os.path.join(checkpoint, "meds_report")
    os.makedirs(out_dir, exist_ok=True)
    for name, fig in (
        ("cluster_sizes.png", plot_clusters(rows, config)),
        ("penalties.png", plot_penalties(rows, config)),
        ("growth.png", plot_growth(rows, memory.updates, config)),
    ):
        fig.savefig(os.path.join(out_dir, name), dpi=120, bbox_inches="tight")
        plt.close(fig)

    counts = penalty_counts(rows, config)
    answers = sum(e["clusters"] + e["noise"] for e in counts.values())
    mean_penalty = sum(p * (e["clusters"] + e["noise"]) for p, e in counts.items()) / max(answers, 1)
    lines = [
        "# MEDS error memory report",
        "",
        f"Checkpoint file: `{source}`  ",
        f"Memory updates (training steps): {memory.updates}; α = {config.alpha}, β = {config.penalty_cap:g}, "
        f"target = {config.target}, noise counts as a cluster: {'yes' if config.noise_as_cluster else 'no'}",
        "",
        "| memories | questions | stored answers | clusters | noise points | mean penalty of a recurrence |",
        "|---|---|---|---|---|---|",
        f"| {len(rows)} | {len({r.key for r in rows})} | {sum(r.stored for r in rows)} "
        f"| {sum(len(r.clusters) for r in rows)} | {sum(r.noise for r in rows)} | {mean_penalty:.4f} |",
        "",
        "- `cluster_sizes.png`: per question (numbered as in the table below), the stored answers of each cluster "
        "and its noise points.",
        "- `penalties.png`: the penalty values a new answer can get, with how many stored answers give each.",
        "- `growth.png`: stored answers per question after each training step.",
        "",
        "![cluster sizes](cluster_sizes.png)",
        "",
        "![penalties](penalties.png) ![growth](growth.png)",
        "",
        f"## The {min(TOP, len(rows))} questions with the most stored answers",
        "",
        "Cluster sizes are listed largest first. The penalties are those of a new answer that votes for the largest "
        "cluster or for the noise points.",
        "",
        "| # | question | outcome | stored | cluster sizes | noise | penalty: largest cluster | penalty: noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, row in enumerate(rows[:TOP], start=1):
        sizes = ", ".join(map(str, row.clusters[:8])) + (", …" if len(row.clusters) > 8 else "")
        question = shorten(row.question, 100).replace("|", "\\|")
        noise_size = row.noise if config.noise_as_cluster else 0
        largest, noise = penalty_term([row.largest, noise_size], config.alpha, config.penalty_cap)
        lines.append(
            f"| {rank} | {question} | {'right' if row.correct else 'wrong'} | {row.stored} | {sizes or '–'} "
            f"| {row.noise} | {f'{largest:.3f}' if len(row.clusters) else '–'} "
            f"| {f'{noise:.3f}' if row.noise else '–'} |"
        )
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
