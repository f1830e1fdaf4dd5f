"""``python -m meds_patch report <checkpoint dir>``: what the error memory of a run holds, as Markdown and PNGs."""

import glob
import os
from typing import Optional

import numpy as np

from meds_patch.config import MEDSConfig
from meds_patch.memory import ErrorMemory
from meds_patch.openrlhf_glue import CHECKPOINT_KEY
from meds_patch.penalty import penalty_term

TOP = 10


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


def cluster_sizes(labels: np.ndarray) -> np.ndarray:
    """The size of each vector's cluster (noise counts as one cluster, as in the reference)."""
    counts = np.bincount(labels + 1)
    return counts[labels + 1]


def write_report(checkpoint: str, out_dir: Optional[str] = None) -> str:
    """Write ``report.md`` and its PNGs to ``out_dir`` (default: ``<checkpoint>/meds_report``); return the .md path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state, source = find_memory_state(checkpoint)
    memory = ErrorMemory()
    memory.load_state_dict(dict(state))
    config = MEDSConfig(**{k: v for k, v in state.get("config", {}).items() if k in MEDSConfig.field_names()})
    prompts = state.get("prompts", {})
    out_dir = out_dir or os.path.join(checkpoint, "meds_report")
    os.makedirs(out_dir, exist_ok=True)

    rows, clusters = [], []
    for (key, correct), labels in memory.labels.items():
        counts = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
        clusters += counts.tolist()
        rows.append((key, correct, len(labels), len(counts), int(counts.max(initial=0)), int((labels < 0).sum())))
    if not rows:
        raise ValueError(f"the error memory in {source} is empty: nothing to report")
    sizes = np.concatenate([cluster_sizes(labels) for labels in memory.labels.values()])
    penalties = penalty_term(sizes, config.alpha, config.penalty_cap)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(clusters or [0], bins=np.arange(0.5, max(clusters or [1]) + 1.5), color="tab:blue", rwidth=0.85)
    ax.set(xlabel="cluster size (vectors)", ylabel="clusters", title="Sizes of recurring error patterns")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cluster_sizes.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(penalties, bins=30, color="tab:red")
    ax.set(xlabel=f"penalty p = min({config.alpha}·ln(n+1), {config.penalty_cap:g})", ylabel="stored answers",
           title="Penalty a new answer in each stored answer's cluster would get")  # fmt: skip
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "penalties.png"), dpi=120)
    plt.close(fig)

    rows.sort(key=lambda r: (-r[4], -r[2]))
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, max(memory.updates, 1) + 1)
    total = np.zeros(len(steps))
    for key, correct, *_ in rows:
        total += np.searchsorted(np.sort(memory.arrivals[(key, correct)]), steps, side="right")
    ax.plot(steps, total / len(rows), color="black", label="mean over questions")
    for key, correct, *_ in rows[:5]:
        arrived = np.sort(memory.arrivals[(key, correct)])
        ax.step(steps, np.searchsorted(arrived, steps, side="right"), where="post", label=f"{key[:8]}", alpha=0.7)
    ax.set(xlabel="training step (memory update)", ylabel="stored answers", title="Memory growth per question")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "growth.png"), dpi=120)
    plt.close(fig)

    lines = [
        "# MEDS error memory report",
        "",
        f"Checkpoint file: `{source}`  ",
        f"Memory updates (training steps): {memory.updates}; α = {config.alpha}, β = {config.penalty_cap:g}, "
        f"target = {config.target}",
        "",
        "| memories | questions | stored answers | clusters | noise points | mean penalty of a recurrence |",
        "|---|---|---|---|---|---|",
        f"| {len(rows)} | {len({r[0] for r in rows})} | {sum(r[2] for r in rows)} | {sum(r[3] for r in rows)} "
        f"| {sum(r[5] for r in rows)} | {penalties.mean():.4f} |",
        "",
        "![cluster sizes](cluster_sizes.png) ![penalties](penalties.png) ![growth](growth.png)",
        "",
        f"## The {min(TOP, len(rows))} questions with the most recurrent errors",
        "",
        "| question key | outcome | question | stored | clusters | largest cluster | penalty for joining it |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, correct, stored, count, largest, _ in rows[:TOP]:
        text = " ".join(prompts.get(key, "(not recorded)").split())[:80].replace("|", "\\|")
        p = float(penalty_term([largest], config.alpha, config.penalty_cap)[0])
        lines.append(
            f"| `{key[:12]}` | {'right' if correct else 'wrong'} | {text} | {stored} | {count} | {largest} | {p:.3f} |"
        )
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
