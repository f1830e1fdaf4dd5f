"""Controller work of MEDS per training step, as history, prompts and rollouts grow; and the Ray-sharded memory.

Two figures per step: the *critical path* (``ErrorMemory.update``, which the trainer waits for) and the *total*
work including the background re-clustering (which overlaps the PPO update in a real run). Synthetic features:
each question has 4 recurring error modes plus noise. Results go to bench/results/controller_scaling.json and a
plot to bench/results/controller_scaling.png.

    python bench/controller_scaling.py [--quick]
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from meds_patch import ErrorMemory, MEDSConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Workload:
    def __init__(self, prompts: int, rollouts: int, layers: int = 14, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.prompts, self.rollouts = prompts, rollouts
        self.modes = 5.0 * self.rng.standard_normal((prompts, 4, layers))
        self.keys = [f"question-{i}" for i in range(prompts) for _ in range(rollouts)]

    def step(self):
        n = self.prompts * self.rollouts
        mode = self.rng.integers(0, 4, size=n)
        features = self.modes[np.repeat(np.arange(self.prompts), self.rollouts), mode]
        features = features + 0.3 * self.rng.standard_normal(features.shape)
        return self.keys, self.rng.random(n) < 0.5, features.astype(np.float32)


def timed_step(memory, batch) -> tuple:
    """(critical path, total) seconds of one step; the previous step's re-clustering is finished first."""
    memory.wait_for_refit()
    start = time.perf_counter()
    memory.update(*batch)
    critical = time.perf_counter() - start
    memory.wait_for_refit()
    return critical, time.perf_counter() - start


def history_sweep(prompts, rollouts, epochs, checkpoints, cap=None):
    """Step time at each epoch in ``checkpoints`` as the history grows from 1 to ``epochs`` visits per question."""
    work, memory = Workload(prompts, rollouts), ErrorMemory(MEDSConfig(max_per_memory=cap))
    rows = []
    for epoch in range(1, epochs + 1):
        critical, total = timed_step(memory, work.step())
        if epoch in checkpoints:
            vectors = memory.summary()["vectors"] / max(memory.summary()["memories"], 1)
            rows.append({"epoch": epoch, "critical_s": critical, "total_s": total, "vectors_per_memory": vectors})
            print(f"  cap={cap} epoch {epoch:3d}: critical {critical:.3f} s, total {total:.3f} s "
                  f"({vectors:.0f} vectors per memory)", flush=True)  # fmt: skip
    return rows


def at_history(prompts, rollouts, epochs, repeats=3, memory=None):
    """Median (critical, total) step time with ``epochs`` of history already stored."""
    work, memory = Workload(prompts, rollouts), memory or ErrorMemory(MEDSConfig())
    for _ in range(epochs):
        memory.update(*work.step())
    times = [timed_step(memory, work.step()) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def exponent(xs, ys) -> float:
    """Slope of log(time) against log(size): time grows as size ** exponent."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def sharded_speedup(prompts, rollouts, epochs, workers=2, repeats=3):
    import ray

    from meds_patch.integration.sharded import ShardedErrorMemory

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        local = at_history(prompts, rollouts, epochs, repeats)[1]
        sharded_memory = ShardedErrorMemory(MEDSConfig(), workers)
        work = Workload(prompts, rollouts)
        for _ in range(epochs):
            sharded_memory.update(*work.step())
        times = []
        for _ in range(repeats):
            batch = work.step()
            start = time.perf_counter()
            sharded_memory.update(*batch)
            sharded_memory.summary()  # a round trip after the shards' background fits
            times.append(time.perf_counter() - start)
        return {"in_process_total_s": local, "sharded_s": statistics.median(times), "workers": workers}
    finally:
        ray.shutdown()


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rows, label, style in ((result["history"], "unbounded", "-"), (result["history_capped"], "cap", "--")):
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["total_s"] for r in rows], "o" + style, color="tab:blue", label=f"total, {label}")
        axes[0].plot(epochs, [r["critical_s"] for r in rows], "s" + style, color="tab:red", label=f"critical, {label}")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":", label="goal 0.5 s")
    axes[0].set(xlabel="epochs of history", ylabel="seconds per step", title="Controller time per step (512 x 16)")
    axes[0].legend(fontsize=7)
    growth = result["growth"]
    for name, color in (("prompts", "tab:green"), ("rollouts", "tab:purple")):
        rows = growth[name]
        axes[1].loglog([r["size"] for r in rows], [r["total_s"] for r in rows], "o-", color=color,
                       label=f"{name} (exponent {growth[name + '_exponent']:.2f})")  # fmt: skip
    axes[1].set(xlabel="prompts per step / rollouts per prompt", ylabel="total seconds per step", title="Growth")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    prompts, rollouts, epochs, cap = (64, 8, 6, 16) if args.quick else (512, 16, 50, 128)
    checkpoints = {1, 2, 4, 6} if args.quick else {1, 5, 10, 20, 30, 40, 50}
    print(f"history sweep: {prompts} prompts x {rollouts} rollouts, about half wrong, K = 14", flush=True)
    result = {
        "history": history_sweep(prompts, rollouts, epochs, checkpoints),
        "history_capped": history_sweep(prompts, rollouts, epochs, checkpoints, cap=cap),
        "cap": cap,
    }
    sizes_p = [prompts // 4, prompts // 2, prompts]
    sizes_r = [max(rollouts // 4, 2), rollouts // 2, rollouts]
    history = 2 if args.quick else 10
    grow_p = [dict(zip(("critical_s", "total_s"), at_history(p, rollouts, history)), size=p) for p in sizes_p]
    grow_r = [dict(zip(("critical_s", "total_s"), at_history(prompts, r, history)), size=r) for r in sizes_r]
    history_rows = result["history"]
    result["growth"] = {
        "prompts": grow_p,
        "rollouts": grow_r,
        "prompts_exponent": exponent(sizes_p, [g["total_s"] for g in grow_p]),
        "rollouts_exponent": exponent(sizes_r, [g["total_s"] for g in grow_r]),
        "memory_size_exponent": exponent(
            [r["vectors_per_memory"] for r in history_rows[1:]], [r["total_s"] for r in history_rows[1:]]
        ),
    }
    result["sharded"] = sharded_speedup(prompts, rollouts, history)
    os.makedirs(RESULTS, exist_ok=True)
    name = "controller_scaling_quick" if args.quick else "controller_scaling"  # a smoke run keeps the real results
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(RESULTS, f"{name}.png"))

    at10 = next((r for r in history_rows if r["epoch"] == 10), history_rows[-1])
    print("\n| measure | value |\n|---|---|")
    print(f"| critical path per step at {at10['epoch']} epochs | {at10['critical_s']:.3f} s |")
    print(f"| total per step at {at10['epoch']} epochs (incl. background re-clustering) | {at10['total_s']:.3f} s |")
    for label, rows in (("unbounded", history_rows), (f"cap {cap}", result["history_capped"])):
        print(f"| total at epoch {rows[0]['epoch']} / {rows[-1]['epoch']}, {label} | "
              f"{rows[0]['total_s']:.3f} s / {rows[-1]['total_s']:.3f} s |")  # fmt: skip
    g = result["growth"]
    print(f"| exponent: prompts per step / rollouts per prompt / vectors per memory | "
          f"{g['prompts_exponent']:.2f} / {g['rollouts_exponent']:.2f} / {g['memory_size_exponent']:.2f} |")  # fmt: skip
    s = result["sharded"]
    print(f"| total per step, in process vs {s['workers']} Ray shards | {s['in_process_total_s']:.3f} s vs "
          f"{s['sharded_s']:.3f} s ({s['in_process_total_s'] / s['sharded_s']:.2f}x) |")  # fmt: skip


if __name__ == "__main__":
    main()
