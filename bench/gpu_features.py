"""GPU time and memory of reading MEDS answer-token features during the trainer's log-prob forward.

A random Qwen2 of Qwen2.5-7B's shape (hidden 3584, 28 blocks, MLP 18944, 28 heads / 4 KV heads, vocab 152064;
bf16, sdpa) runs the forward of OpenRLHF's Actor.forward (logits cast to fp32, then next-token log-probs) in three
variants, in this order in one process, or one per process with --variant:

    plain          the trainer's forward alone
    hooks          forward hooks on the last K blocks keep each block's output only at one answer position p per row;
                   afterwards the LM head reads the logit of token p + 1 (final norm on the last block only)
    hidden_states  output_hidden_states=True keeps every layer's (B, T, H) states, then the same logit lens at p

Per variant: the median time of --repeats steps (forward + log-probs + features) after --warmup ones, and the peak
of torch.cuda.max_memory_allocated over them minus what was allocated before (weights and inputs). At the default
4 x 4096 tokens the fp32 logits are 10 GB and the peak about 31 GB (34 GB with hidden_states): one H100 holds it.
Features of hooks and hidden_states are checked to agree, and the last layer's to equal the model's own logit.

Self-contained (torch, transformers, stdlib), so it can be copied alone to a GPU machine:

    python gpu_features.py [--batch 4 --seq 4096 --k 14 --warmup 1 --repeats 5 --variant all]
    python gpu_features.py --device cpu --tiny      # smoke test: tiny float32 model

On a CPU the memory column is the RSS peak, which heap reuse blurs when the variants share a process.
"""

import argparse
import gc
import json
import statistics
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

VARIANTS = ("plain", "hooks", "hidden_states")
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


class AnswerCapture:
    """Forward hooks on the last K blocks that keep each block's output only at flat indices into (B * T, H)."""

    def __init__(self, model, flat_index, k):
        self.model, self.flat_index = model, flat_index
        self.blocks = model.model.layers[-k:]
        self.states = [None] * k
        self.handles = []

    def __enter__(self):
        self.handles = [block.register_forward_hook(self._keeper(i)) for i, block in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _keeper(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.states[i] = hidden.reshape(-1, hidden.shape[-1])[self.flat_index]

        return hook

    def features(self, targets):
        states = torch.stack(self.states[:-1] + [self.model.model.norm(self.states[-1])], dim=1)
        return target_logits(self.model.lm_head(states), targets)


def target_logits(lens, targets):
    """(B, K, V) logit-lens output -> (B, K) float32 logits of each row's target token."""
    return lens.gather(-1, targets.view(-1, 1, 1).expand(-1, lens.shape[1], 1)).squeeze(-1).float()


def next_token_log_probs(logits, ids):
    """OpenRLHF's log_probs_from_logits on fp32 logits without flash-attn: gather minus a chunked logsumexp."""
    labels = torch.roll(ids, shifts=-1, dims=1)
    flat = logits.reshape(-1, logits.shape[-1])
    logsumexp = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in flat.split(1024)])
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logsumexp.view(labels.shape)


def build_model(shape, device, dtype):
    config = Qwen2Config(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
    default_dtype = torch.get_default_dtype()
    # Create the parameters in their final dtype on the device: no fp32 copy of 7B weights, init runs on the GPU.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def make_batch(batch, seq, vocab, device, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    rows = torch.arange(batch)
    positions = torch.randint(seq // 2, seq - 1, (batch,), generator=generator)  # p + 1 stays inside the row
    mask = torch.ones_like(ids)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as OpenRLHF's Actor.forward builds them
    tensors = dict(ids=ids, mask=mask, position_ids=position_ids, rows=rows, positions=positions)
    tensors.update(targets=ids[rows, positions + 1], flat_index=rows * seq + positions)
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def step(variant, model, batch, k):
    """One trainer forward + log-probs (+ features): returns log-probs, (B, K) features, the model's own logit."""

    def forward(**kwargs):
        out = model(batch["ids"], attention_mask=batch["mask"], position_ids=batch["position_ids"], **kwargs)
        out["logits"] = out["logits"].float()  # replaced in place, as upstream does, so the bf16 copy is freed
        return out, next_token_log_probs(out["logits"], batch["ids"])

    rows, positions, targets = batch["rows"], batch["positions"], batch["targets"]
    features = None
    if variant == "hooks":
        with AnswerCapture(model, batch["flat_index"], k) as captured:
            out, log_probs = forward()
        features = captured.features(targets)
    elif variant == "hidden_states":
        out, log_probs = forward(output_hidden_states=True)
        # transformers stores the last block's output with the final norm already applied: no norm here.
        states = torch.stack([hidden[rows, positions] for hidden in out.hidden_states[-k:]], dim=1)
        features = target_logits(model.lm_head(states), targets)
    else:
        out, log_probs = forward()
    return log_probs, features, out["logits"][rows, positions, targets]


def proc_status_bytes(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def start_peak_window(device):
    """Reset the peak-memory mark; returns the bytes in use now (CUDA allocator, or the process RSS on a CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    return proc_status_bytes("VmRSS")


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_bytes("VmHWM")


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


def table(results):
    base = results.get("plain")
    lines = [
        "| variant | median forward time (s) | time vs plain | peak forward memory (MiB) | memory vs plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, row in results.items():
        time_vs = memory_vs = "n/a"
        if base:
            extra = row["forward_peak_mib"] - base["forward_peak_mib"]
            time_vs = f"{100 * (row['median_s'] / base['median_s'] - 1):+.1f}%"
            share = f"{100 * extra / base['forward_peak_mib']:+.1f}%" if base["forward_peak_mib"] else "n/a"
            memory_vs = f"{extra:+.1f} MiB ({share})"
        lines.append(
            f"| {variant} | {row['median_s']:.3f} | {time_vs} | {row['forward_peak_mib']:.1f} | {memory_vs} |"
        )
    return "\n".join(lines)


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
    torch.manual_seed(args.seed)
    model = build_model(shape, device, dtype)
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
