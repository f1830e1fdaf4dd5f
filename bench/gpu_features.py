"""GPU time and memory of reading MEDS answer-token features during the trainer's log-prob forward.

A random Qwen2 of Qwen2.5-7B's shape (hidden 3584, 28 blocks, MLP 18944, 28 heads / 4 KV heads, vocab 152064;
bf16, sdpa) runs the forward of OpenRLHF's Actor.forward (logits cast to fp32, then next-token log-probs) in the
three variants of bench/feature_forward.py, in this order in one process, or one per process with --variant:
plain, hooks (the shipped meds_patch.core.features.AnswerHiddenStates, as the trainer's glue uses it) and
hidden_states (output_hidden_states=True, as the authors' code).

Per variant: the median time of --repeats steps (forward + log-probs + features) after --warmup ones, and the peak
of torch.cuda.max_memory_allocated over them minus what was allocated before (weights and inputs). At the default
4 x 4096 tokens the fp32 logits are 10 GB and the peak about 31 GB (34 GB with hidden_states): one H100 holds it.
Features of hooks and hidden_states are checked to agree, and the last layer's to equal the model's own logit.

Run from a checkout (it imports bench/feature_forward.py and meds_patch from the tree, installed or not):

    python bench/gpu_features.py [--batch 4 --seq 4096 --k 14 --warmup 1 --repeats 5 --variant all]
    python bench/gpu_features.py --device cpu --tiny      # smoke test: tiny float32 model

On a CPU the memory column is the RSS peak, which heap reuse blurs when the variants share a process.
"""

import argparse
import gc
import json
import statistics
import time

import torch
import transformers
from feature_forward import VARIANTS, build_model, make_batch, proc_status_kib, reset_peak_rss, step, table

QWEN25_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2720,
)


def start_peak_window(device):
    """Reset the peak-memory mark; returns the bytes in use now (CUDA allocator, or the process RSS on a CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return proc_status_kib("VmRSS") * 1024


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_kib("VmHWM") * 1024


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(variant, model, batch, args, device):
    for _ in range(args.warmup):
        step(variant, model, batch, args.k)
    # The window opens after the warm-up, so workspaces allocated once (cuBLAS, oneDNN) count as "before".
    before = start_peak_window(device)
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        outputs = step(variant, model, batch, args.k)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = peak_bytes(device)
    result = dict(
        median_s=statistics.median(times),
        times_s=times,
        before_gib=before / 2**30,
        peak_gib=peak / 2**30,
        forward_peak_mib=(peak - before) / 2**20,
    )
    return result, outputs


def check(outputs, dtype):
    """Max |difference| of each consistency check, and whether all are within the dtype's rounding."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 keeps 8 significant bits
    diffs = {}
    if "plain" in outputs:
        for variant, (log_probs, _, _) in list(outputs.items())[1:]:
            diffs[f"log_probs {variant} vs plain"] = (log_probs - outputs["plain"][0]).abs().max().item()
    for variant, (_, features, own) in outputs.items():
        if features is not None:
            diffs[f"{variant} last layer vs model logit"] = (features[:, -1] - own).abs().max().item()
    if "hooks" in outputs and "hidden_states" in outputs:
        diffs["hooks vs hidden_states features"] = (
            (outputs["hooks"][1] - outputs["hidden_states"][1]).abs().max().item()
        )
    scale = max(1.0, max((out[2].abs().max().item() for out in outputs.values()), default=1.0))
    return diffs, all(diff <= tol * scale for diff in diffs.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model, 2 x 64 tokens: a smoke test")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16, tiny fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--k", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=("all",) + VARIANTS, default="all")
    args = parser.parse_args()
    if args.tiny:
        parser.set_defaults(batch=2, seq=64, repeats=2)  # flags given explicitly still win
        args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    shape = TINY if args.tiny else QWEN25_7B
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, transformers {transformers.__version__}")

    start = time.perf_counter()
    model = build_model(shape, args.seed, device, dtype)
    batch = make_batch(args.batch, args.seq, shape["vocab_size"], device, args.seed)
    build_s = time.perf_counter() - start
    print(f"model built in {build_s:.1f} s: {shape}, {dtype}, batch {args.batch} x {args.seq}, K = {args.k}")

    results, outputs = {}, {}
    for variant in VARIANTS if args.variant == "all" else (args.variant,):
        results[variant], outputs[variant] = measure(variant, model, batch, args, device)
    diffs, ok = check(outputs, dtype)

    print(table(results))
    print(
        "checks (max |diff|):", ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()), "OK" if ok else "FAIL"
    )
    config = dict(vars(args), dtype=str(dtype), shape=shape, build_s=build_s)
    info = dict(device=name, torch=torch.__version__, transformers=transformers.__version__)
    print(json.dumps(dict(info, config=config, results=results, checks=dict(diffs, ok=ok))))
    if not ok:
        raise SystemExit("consistency checks failed")


if __name__ == "__main__":
    main()
