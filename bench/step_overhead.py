"""What MEDS adds to a whole training step of upstream's ``train_ppo_ray``, on CPU, measured so it can be trusted.

Two arms with the same seed and the same work per step (no dynamic filtering, no evaluation, no checkpoint): upstream
(no ``--meds``) and ``--meds --algo.meds.alpha 0`` (4 layers), on the tiny Qwen2 of bench/collapse_ablation.py.
At alpha 0 MEDS does all its work (capture, answer search, memory, re-clustering, metrics) but every penalty is 0,
so both arms train on the same rewards; with alpha > 0 the policies part and their rollouts (lengths, answers)
differ, which is MEDS's effect, not its cost (``--alpha`` sets it). The arms run alternately on one Ray cluster,
in the order AB BA AB ... so that a drift of the machine falls on both; each pair gives the ratio of its two median
step intervals. Then one more pair runs under py-spy (sampling the job's processes, idle threads left out), and the
samples inside MEDS's code are summed per part: CPU seconds per step of each part, in each arm.

    python bench/step_overhead.py            # 5 timed pairs of 12 steps + 1 profiled pair, about 17 min here
    python bench/step_overhead.py --quick    # 1 timed pair + 1 profiled pair of 4 steps: the pipeline only

Results: bench/results/overhead.json (``--quick``: overhead_quick.json), and a table on stdout.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import psutil
from collapse_ablation import RESULTS, SFT_MIX
from dapo_runs import dapo_args, questions, step_intervals, step_times, sums_model, train_ppo_ray

from meds_patch.cpu.cluster import CPU_ENV, LocalRayCluster
from meds_patch.cpu.tiny_math import write_prompts

ARMS = ("upstream", "meds")
RATE = 100  # py-spy samples per second
# Each part of MEDS as the (file, functions) whose frames it spends its time in. A sample is charged to the part of
# its innermost MEDS frame, so time spent in hdbscan under the background fit counts as that fit.
PARTS = {
    "answer search (actor)": ("core/features.py", {"find_answer_positions", "token_search", "text_search",
                                                   "_vocabulary_flags"}),
    "capture hooks (actor)": ("core/features.py", {"hook", "__init__", "__enter__", "__exit__", "decoder_parts"}),
    "LM head at the answer (actor)": ("core/features.py", {"logits"}),
    "capture set-up (actor)": ("integration/glue.py", {"start_capture", "finish_capture"}),
    "attaching features": ("integration/glue.py", {"attach_features"}),
    "reading outcomes": ("integration/glue.py", {"record_outcomes"}),
    "memory update (critical path)": ("core/memory.py", {"update", "_cluster_sizes", "_append", "checked_step",
                                                         "memory_groups", "measure", "unit_rows",
                                                         "wait_for_refit"}),
    "re-clustering (background thread)": ("core/memory.py", {"_fit_all", "cluster_labels"}),
    "final answers for metrics": ("integration/glue.py", {"final_answers"}),
    "shaping the rewards": ("integration/glue.py", {"shape_rewards", "apply_penalties", "penalty_term",
                                                    "prompt_key", "wrong_answer_diversity"}),
    "logging": ("integration/glue.py", {"step_metrics", "summary"}),
    "checkpoint state": ("integration/glue.py", {"memory_state", "restore_memory", "state_dict",
                                                 "load_state_dict"}),
}  # fmt: skip
FILES_OF = {"apply_penalties": "core/penalty.py", "penalty_term": "core/penalty.py", "prompt_key": "core/memory.py",
            "wrong_answer_diversity": "core/metrics.py", "summary": "core/memory.py",
            "state_dict": "core/memory.py", "load_state_dict": "core/memory.py"}  # fmt: skip


def part_of(frame: str):
    """The part a raw py-spy frame ``function (path:line)`` belongs to, or None."""
    function, _, where = frame.rpartition(" (")
    path = where.rsplit(":", 1)[0]
    if "meds_patch/" not in path:
        return None
    for part, (file, functions) in PARTS.items():
        if function in functions and path.endswith(FILES_OF.get(function, file)):
            return part
    return None


def charge(raw_file: str) -> Counter:
    """Samples per part in one py-spy raw file (``frame;frame;... count``, outermost first)."""
    samples = Counter()
    with open(raw_file, errors="replace") as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            parts = [part_of(frame) for frame in stack.split(";")]
            inner = next((p for p in reversed(parts) if p), None)
            samples[inner or "(not MEDS)"] += int(count)
    return samples


class ClusterProcesses:
    """Every process of ``cluster`` while a job runs (its nodes' and the job driver's): the CPU time of each (psutil's,
    all its threads, native ones included) and of the whole machine, four times a second; with ``spy``, also
    a py-spy recorder on each Ray worker and vLLM process the job starts, attached as it appears."""

    def __init__(self, cluster: LocalRayCluster, folder: str, spy: bool):
        self.cluster, self.folder, self.spy, self.stop = cluster, folder, spy, threading.Event()
        self.spies, self.titles, self.ticks, self.machine = {}, {}, defaultdict(list), []
        self.before = set()  # processes of the cluster from before the job (its agents, idle workers): not spied on
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        while not self.stop.wait(0.25):
            now = time.time()
            machine = psutil.cpu_times()
            self.machine.append((now, sum(machine) - machine.idle - machine.iowait))  # busy: all but idle and iowait
            for pid in self.cluster.own_processes():
                try:
                    process = psutil.Process(pid)
                    argv, used = process.cmdline(), process.cpu_times()
                except psutil.Error:
                    continue
                self.ticks[pid].append((now, used.user + used.system))
                title = argv[0].split(".")[0].strip()
                if not title.startswith(("ray::", "VLLM")):
                    title = " ".join(os.path.basename(a) for a in argv[:2] if a)[:48]
                # A worker takes its actor's name once it has one; a process that has exited reads as ""
                if title and (title != "ray::IDLE" or pid not in self.titles):
                    self.titles[pid] = title
                if not self.spy or pid in self.spies or pid in self.before or not title.startswith(("ray::", "VLLM")):
                    continue
                out = os.path.join(self.folder, f"{pid}.txt")
                self.spies[pid] = subprocess.Popen(
                    [py_spy, "record", "-p", str(pid), "-r", str(RATE), "--format", "raw", "--nonblocking", "-o", out],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip

    def __enter__(self):
        os.makedirs(self.folder)
        self.before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for spy in self.spies.values():  # a spy on a worker that outlives the job: stopped, it writes its file
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
        for spy in self.spies.values():
            spy.wait(timeout=60)

    def cpu_seconds(self, start: float, end: float) -> dict:
        """CPU seconds spent between two wall-clock times: {process title: seconds} and the whole machine's busy
        seconds under "(machine)". A reading is the last one taken at or before the time (0 before the first)."""

        def at(readings, t):
            return next((value for when, value in reversed(readings) if when <= t), 0.0)

        spent = defaultdict(float)
        for pid, readings in self.ticks.items():
            spent[self.titles.get(pid, "(exited unnamed)")] += at(readings, end) - at(readings, start)
        spent["(machine)"] = at(self.machine, end) - at(self.machine, start)
        return dict(spent)

    def samples(self) -> dict:
        """{process title: Counter of py-spy samples per part}."""
        by_title = defaultdict(Counter)
        for pid, title in self.titles.items():
            if os.path.exists(os.path.join(self.folder, f"{pid}.txt")):
                by_title[title].update(charge(os.path.join(self.folder, f"{pid}.txt")))
        return dict(by_title)


def one_run(cluster, model, work, name, alpha, episodes, profile=False):
    folder = os.path.join(work, name)
    # No dynamic filtering (its refills of filtered groups would vary the work per step) and no evaluation.
    argv = dapo_args(
        model, folder, seed=0, episodes=episodes, run_name="ablation", alpha=alpha, dynamic_filtering=False
    )
    with ClusterProcesses(cluster, os.path.join(folder, "processes"), spy=profile) as processes:
        values = train_ppo_ray(cluster, argv, folder)
    walls = step_times(folder)
    intervals = step_intervals(walls)
    # CPU per step interval, from the first step's log to the last: start-up and the final save left out
    first, last = min(walls.values()), max(walls.values())
    cpu = {title: seconds / (len(walls) - 1) for title, seconds in processes.cpu_seconds(first, last).items()}
    controller = list(values.get("train/meds/controller_seconds", {}).values())
    lengths = [v for tag, points in values.items() if tag.endswith("response_length") for v in points.values()]
    return {"intervals": intervals, "steps": len(values.get("train/reward", {})), "controller_seconds": controller,
            "mean_response_length": float(np.mean(lengths)) if lengths else None,
            # upstream's own per-phase seconds (make_experience, ppo_train, broadcast), median over the steps
            "phases": {tag: statistics.median(points.values()) for tag, points in values.items() if "timing/" in tag},
            "cpu_seconds_per_step": cpu, "samples": processes.samples() if profile else None}  # fmt: skip


def bootstrap_interval(upstream_runs, meds_runs, draws=2000, seed=0):
    """95% interval of median(meds) / median(upstream), resampling the pairs, then the intervals within each run."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(draws):
        chosen = rng.integers(len(upstream_runs), size=len(upstream_runs))
        up = np.concatenate([rng.choice(upstream_runs[i], len(upstream_runs[i])) for i in chosen])
        me = np.concatenate([rng.choice(meds_runs[i], len(meds_runs[i])) for i in chosen])
        ratios.append(np.median(me) / np.median(up))
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="timed pairs of runs (default: 5)")
    parser.add_argument("--alpha", type=float, default=0.0, help="--algo.meds.alpha of the meds arm (default: 0)")
    parser.add_argument("--episodes", type=int, default=3, help="episodes per run, 4 steps each (default: 3)")
    parser.add_argument("--quick", action="store_true", help="1 timed pair and the profiled pair, 1 episode each")
    parser.add_argument("--results", default=RESULTS, help="where the JSON goes (default: bench/results)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.episodes = 1, 1
    start = time.time()
    model = sums_model("carry-qwen2", SFT_MIX)
    pairs = questions("carry")
    random.Random(0).shuffle(pairs)
    work = tempfile.mkdtemp(prefix="meds-overhead-")
    write_prompts(os.path.join(work, "train.jsonl"), pairs[:32])  # collapse_ablation's training questions
    timed, profiled = [], {}
    try:
        with LocalRayCluster(env=CPU_ENV) as cluster:
            alphas = {"upstream": None, "meds": args.alpha}
            for pair in range(args.pairs):
                runs = {}
                for arm in ARMS if pair % 2 == 0 else ARMS[::-1]:
                    print(f"[{time.time() - start:.0f} s] pair {pair + 1}: {arm}", flush=True)
                    runs[arm] = one_run(cluster, model, work, f"{arm}-{pair}", alphas[arm], args.episodes)
                timed.append(runs)
            for arm in ARMS:
                print(f"[{time.time() - start:.0f} s] profiled: {arm}", flush=True)
                profiled[arm] = one_run(cluster, model, work, f"{arm}-p", alphas[arm], args.episodes, profile=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    pair_ratios = [statistics.median(r["meds"]["intervals"]) / statistics.median(r["upstream"]["intervals"])
                   for r in timed]  # fmt: skip
    ratio = statistics.median(pair_ratios)
    pooled = statistics.median(x for r in timed for x in r["meds"]["intervals"]) / statistics.median(
        x for r in timed for x in r["upstream"]["intervals"]
    )
    interval = bootstrap_interval([r["upstream"]["intervals"] for r in timed], [r["meds"]["intervals"] for r in timed])
    lines = [f"meds arm: --meds --algo.meds.alpha {args.alpha:g}; median seconds per step (intervals), mean response "
             "length", "", "| pair | order | upstream | meds | ratio |", "|---|---|---|---|---|"]  # fmt: skip
    for i, (r, q) in enumerate(zip(timed, pair_ratios)):
        cells = [f"{statistics.median(r[a]['intervals']):.3f} ({len(r[a]['intervals'])}), "
                 f"{r[a]['mean_response_length'] or float('nan'):.1f} tok" for a in ARMS]  # fmt: skip
        lines.append(f"| {i + 1} | {'AB' if i % 2 == 0 else 'BA'} | {cells[0]} | {cells[1]} | {q:.3f} |")
    lines += ["", f"Median ratio over {len(timed)} pairs: {ratio:.3f} (pairs {min(pair_ratios):.3f} to "
              f"{max(pair_ratios):.3f}; bootstrap 95% interval {interval[0]:.3f} to {interval[1]:.3f}); "
              f"all intervals pooled: {pooled:.3f}."]  # fmt: skip

    # Where the step's seconds go: upstream's own phase timers, and the CPU of each process within the steps
    phases = sorted({tag for r in timed for arm in ARMS for tag in r[arm]["phases"]})
    lines += ["", "Median over the pairs of each run's median seconds per step, by upstream's phase timers:", "",
              "| phase | upstream | meds | meds - upstream |", "|---|---|---|---|"]  # fmt: skip
    phase_table = {}
    for tag in phases:
        per_arm = {a: statistics.median(r[a]["phases"].get(tag, float("nan")) for r in timed) for a in ARMS}
        phase_table[tag] = per_arm
        lines.append(f"| {tag} | {per_arm['upstream']:.3f} | {per_arm['meds']:.3f} | "
                     f"{per_arm['meds'] - per_arm['upstream']:+.3f} |")  # fmt: skip
    titles = sorted(
        {t for r in timed for a in ARMS for t in r[a]["cpu_seconds_per_step"]}, key=lambda t: t != "(machine)"
    )
    lines += ["", "CPU seconds per step, from /proc (every thread), between the first and the last step's log; median "
              "over the pairs ('(machine)': the whole machine's busy CPU, of 2 cores):", "",
              "| process | upstream | meds | meds - upstream |", "|---|---|---|---|"]  # fmt: skip
    cpu_table = {}
    for title in titles:
        per_arm = {a: statistics.median(r[a]["cpu_seconds_per_step"].get(title, 0.0) for r in timed) for a in ARMS}
        cpu_table[title] = per_arm
        if max(per_arm.values()) >= 0.005:
            lines.append(f"| {title} | {per_arm['upstream']:.3f} | {per_arm['meds']:.3f} | "
                         f"{per_arm['meds'] - per_arm['upstream']:+.3f} |")  # fmt: skip

    steps = {arm: max(profiled[arm]["steps"], 1) for arm in ARMS}
    lines += ["", "CPU seconds per training step, by py-spy in the profiled pair (every Ray worker and vLLM process, "
              "idle threads left out; '(not MEDS)' is the rest of the run, start-up included):", "",
              "| part | process | upstream | meds |", "|---|---|---|---|"]  # fmt: skip
    breakdown = []
    titles = sorted(set(profiled["upstream"]["samples"]) | set(profiled["meds"]["samples"]))
    for part in [*PARTS, "(not MEDS)"]:
        for title in titles:
            per_step = {arm: profiled[arm]["samples"].get(title, Counter())[part] / RATE / steps[arm] for arm in ARMS}
            if any(per_step.values()):
                breakdown.append({"part": part, "process": title, **per_step})
                lines.append(f"| {part} | {title} | {per_step['upstream']:.4f} | {per_step['meds']:.4f} |")
    total_s = {arm: sum(row[arm] for row in breakdown) for arm in ARMS}
    lines.append(f"| everything sampled | all | {total_s['upstream']:.3f} | {total_s['meds']:.3f} |")
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.results, exist_ok=True)
    out = os.path.join(args.results, f"overhead{'_quick' if args.quick else ''}.json")
    with open(out, "w") as fh:
        json.dump({"ratio": ratio, "pooled_ratio": pooled, "alpha": args.alpha, "pair_ratios": pair_ratios,
                   "bootstrap_95": interval,
                   "pairs": [{a: {k: v for k, v in r[a].items() if k != "samples"} for a in ARMS} for r in timed],
                   "phases_seconds_per_step": phase_table, "process_cpu_seconds_per_step": cpu_table,
                   "breakdown_cpu_seconds_per_step": breakdown, "profiled_steps": steps,
                   "seconds": time.time() - start, "table": report}, fh, indent=1)  # fmt: skip
    print(f"done in {time.time() - start:.0f} s; {out}")


if __name__ == "__main__":
    main()
