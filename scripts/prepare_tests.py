"""Build, once and before the tests, what many of them share: the fine-tuned tiny models (cached in
~/.cache/openrlhf-meds) and DeepSpeed's CPU ops that every training run loads (compiled into
~/.cache/torch_extensions). On a fresh machine this takes minutes that would otherwise fall inside the first test
that needs each one, and within its time limit; on a warm one, seconds."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import collapse_ablation  # noqa: E402
import collapse_experiment  # noqa: E402
from dapo_runs import sums_model  # noqa: E402

from meds_patch.cpu.tiny_math import prepared_model, recipe_model  # noqa: E402

start = time.time()
built = {
    "demo model": prepared_model,
    "recipe model (14 blocks)": recipe_model,
    "carry model (collapse_ablation)": lambda: sums_model("carry-qwen2", collapse_ablation.SFT_MIX),
    "two-family model (collapse_experiment)": lambda: sums_model("twofamily-qwen2", collapse_experiment.SFT_MIX),
}
for name, build in built.items():
    path = build()
    print(f"[{time.time() - start:.0f} s] {name}: {path}", flush=True)

from deepspeed.accelerator import get_accelerator  # noqa: E402

# What DeepSpeed compiles on first use in a CPU training run: its Adam and its shared-memory collectives.
for builder in ("FusedAdamBuilder", "ShareMemCommBuilder"):
    get_accelerator().create_op_builder(builder).load()
print(f"[{time.time() - start:.0f} s] DeepSpeed's CPU ops are built", flush=True)
