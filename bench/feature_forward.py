"""The trainer's log-prob forward with and without MEDS features, as feature_overhead.py (CPU) and gpu_features.py
(GPU) build, run and tabulate it. A random Qwen2 (sdpa) runs OpenRLHF's Actor.forward (logits cast to fp32, then
next-token log-probs) in one of three variants:

    plain          the trainer's forward alone
    hooks          the same forward inside the shipped meds_patch.core.features.AnswerHiddenStates, built and read
                   as meds_patch.integration.glue.start_capture / finish_capture do (answer indices and targets on
                   the CPU, one answer position p per row), then .logits(targets): the LM head runs on B x K vectors
    hidden_states  the forward with output_hidden_states=True (every layer's (B, T, H) states kept, as the authors'
                   code does), then the same logit lens at p of the last K states
"""

import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

# The GPU machine receives this checkout without installing it: import the hooks from the tree these scripts lie in
# (where the package is installed editable, that is the same tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meds_patch.core.features import AnswerHiddenStates  # noqa: E402

VARIANTS = ("plain", "hooks", "hidden_states")


def build_model(shape, seed, device="cpu", dtype=torch.float32):
    """A random Qwen2ForCausalLM in eval mode; ``shape`` holds Qwen2Config's size fields (hidden_size, ...)."""
    torch.manual_seed(seed)
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
    targets = ids[rows, positions + 1]
    tensors = dict(ids=ids, mask=mask, position_ids=position_ids, rows=rows, positions=positions, targets=targets)
    on_device = {name: tensor.to(device) for name, tensor in tensors.items()}
    # start_capture builds the hooks' flat indices and targets on the CPU; AnswerHiddenStates moves them itself.
    return dict(on_device, flat_index=rows * seq + positions, cpu_targets=targets)


def next_token_log_probs(logits, ids):
    """OpenRLHF's log_probs_from_logits on fp32 logits without flash-attn: gather minus a chunked logsumexp."""
    labels = torch.roll(ids, shifts=-1, dims=1)
    flat = logits.reshape(-1, logits.shape[-1])
    logsumexp = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in flat.split(1024)])
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logsumexp.view(labels.shape)


def step(variant, model, batch, k):
    """One trainer forward + log-probs (+ features): returns log-probs, (B, K) features, the model's own logit."""

    def forward(**kwargs):
        out = model(batch["ids"], attention_mask=batch["mask"], position_ids=batch["position_ids"], **kwargs)
        out["logits"] = out["logits"].float()  # replaced in place, as upstream does, so a bf16 copy is freed
        return out, next_token_log_probs(out["logits"], batch["ids"])

    rows, positions, targets = batch["rows"], batch["positions"], batch["targets"]
    features = None
    if variant == "hooks":
        with AnswerHiddenStates(model, batch["flat_index"], batch["ids"].numel(), k) as captured:
            out, log_probs = forward()
        features = captured.logits(batch["cpu_targets"])
    elif variant == "hidden_states":
        out, log_probs = forward(output_hidden_states=True)
        # transformers stores the last block's output with the final norm already applied: no norm here.
        states = torch.stack([hidden[rows, positions] for hidden in out.hidden_states[-k:]], dim=1)
        lens = model.lm_head(states)
        features = lens.gather(-1, targets.view(-1, 1, 1).expand(-1, k, 1)).squeeze(-1).float()
    else:
        out, log_probs = forward()
    return log_probs, features, out["logits"][rows, positions, targets]


def proc_status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def percent(part, whole):
    return f"{100 * part / whole:+.1f}%" if whole else "n/a"


def table(results):
    """Markdown table of {variant: {median_s, forward_peak_mib, ...}}, each against plain where plain ran."""
    plain = results.get("plain")
    lines = [
        "| variant | median forward time (s) | time vs plain | peak forward memory (MiB) | memory vs plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, row in results.items():
        time_vs = memory_vs = "n/a"
        if plain:
            extra = row["forward_peak_mib"] - plain["forward_peak_mib"]
            time_vs = percent(row["median_s"] - plain["median_s"], plain["median_s"])
            memory_vs = f"{extra:+.1f} MiB ({percent(extra, plain['forward_peak_mib'])})"
        lines.append(
            f"| {variant} | {row['median_s']:.3f} | {time_vs} | {row['forward_peak_mib']:.1f} | {memory_vs} |"
        )
    return "\n".join(lines)
