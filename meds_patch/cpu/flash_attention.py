"""Plain-torch CPU kernels for flash-attn's four custom ops (``flash_attn::_flash_attn_*``), which flash-attn 2.8.3
registers for CUDA only. GPU runs keep the CUDA kernels; these exist so that the CPU harness runs the same
flash-attention code paths (sample packing through ``flash_attn_varlen_func``, ring attention through the private
varlen ops and their log-sum-exp) instead of falling back to another attention implementation.
"""

import importlib
from typing import Optional, Tuple

import torch

UNSUPPORTED = "not supported by the MEDS CPU flash-attention kernels"

_registered = False


def _reject_unsupported(
    dropout_p: float,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
) -> None:
    unsupported = {
        f"dropout_p={dropout_p}": dropout_p > 0,
        f"softcap={softcap}": softcap > 0,
        "alibi_slopes": alibi_slopes is not None,
        "return_softmax=True": return_softmax,
        "block_table (paged KV cache)": block_table is not None,
        "leftpad_k": leftpad_k is not None,
        "seqused_k": seqused_k is not None,
    }
    for option, requested in unsupported.items():
        if requested:
            raise NotImplementedError(f"flash-attention option {option} is {UNSUPPORTED}")


def visible_keys(
    len_q: int, len_k: int, causal: bool, window_size_left: int, window_size_right: int, device=None
) -> torch.Tensor:
    """Boolean [len_q, len_k] mask of the keys each query attends to, with flash-attn's bottom-right alignment:
    query i sits at key position i + len_k - len_q, so extra keys form a prefix every query sees."""
    query_position = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    key_position = torch.arange(len_k, device=device)[None, :]
    if causal:
        window_size_right = 0
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_size_right >= 0:
        allowed &= key_position <= query_position + window_size_right
    if window_size_left >= 0:
        allowed &= key_position >= query_position - window_size_left
    return allowed


def _heads_first(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[tokens, heads, dim] -> float32 [num_heads, tokens, dim], repeating kv heads for grouped-query attention
    (query head h reads kv head h // (num_heads // kv_heads))."""
    x = x.float().transpose(0, 1)
    return x.repeat_interleave(num_heads // x.shape[0], dim=0)


def _masked_scores(q, k, softmax_scale, mask) -> torch.Tensor:
    scores = softmax_scale * (q @ k.transpose(-1, -2))
    return scores.masked_fill(~mask, float("-inf"))


def _sequence_forward(q, k, v, softmax_scale, mask) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sequence, q [Lq, Hq, D], k/v [Lk, Hk, D]: float32 out [Lq, Hq, D] and lse [Hq, Lq]."""
    num_heads = q.shape[1]
    scores = _masked_scores(_heads_first(q, num_heads), _heads_first(k, num_heads), softmax_scale, mask)
    lse = torch.logsumexp(scores, dim=-1)
    # A query that sees no key gets lse = +inf (flash's convention): exp(score - lse) is then 0 for every key, so
    # its output row is 0 here and its gradients are 0 in the backward, with no NaN.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    probs = torch.exp(scores - lse[..., None])
    out = probs @ _heads_first(v, num_heads)
    return out.transpose(0, 1), lse


def _sequence_backward(dout, q, k, v, out, lse, softmax_scale, mask):
    """One sequence: float32 dq [Lq, Hq, D], dk and dv [Lk, Hk, D], softmax_d [Hq, Lq]. The probabilities come from
    the given lse, not a fresh softmax: ring attention passes the lse and out combined over all key blocks."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    q_h, k_h, v_h = (_heads_first(x, num_heads) for x in (q, k, v))
    dout_h, out_h = _heads_first(dout, num_heads), _heads_first(out, num_heads)
    probs = torch.exp(_masked_scores(q_h, k_h, softmax_scale, mask) - lse.float()[..., None])
    softmax_d = (dout_h * out_h).sum(dim=-1)
    dv_h = probs.transpose(-1, -2) @ dout_h
    dprobs = dout_h @ v_h.transpose(-1, -2)
    dscores = probs * (dprobs - softmax_d[..., None])
    dq_h = softmax_scale * (dscores @ k_h)
    dk_h = softmax_scale * (dscores.transpose(-1, -2) @ q_h)

    def sum_query_groups(grad):  # [Hq, Lk, D] -> [Lk, Hk, D]: a kv head's gradient sums over the heads reading it
        return grad.unflatten(0, (num_kv_heads, num_heads // num_kv_heads)).sum(dim=1).transpose(0, 1)

    return dq_h.transpose(0, 1), sum_query_groups(dk_h), sum_query_groups(dv_h), softmax_d


def _write_gradients(dq, dk, dv, dq_full, dk_full, dv_full) -> None:
    for target, value in ((dq, dq_full), (dk, dk_full), (dv, dv_full)):
        if target is not None:
            target.copy_(value)


def varlen_forward_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel of ``flash_attn::_flash_attn_varlen_forward``: (out, softmax_lse [Hq, total_q], empty S_dmask,
    rng_state) for sequences packed along dim 0 of q [total_q, Hq, D] and k/v [total_k, Hk, D]."""
    _reject_unsupported(dropout_p, softcap, alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    softmax_lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for start_q, end_q, start_k, end_k in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        mask = visible_keys(end_q - start_q, end_k - start_k, causal, window_size_left, window_size_right, q.device)
        sequence_out, sequence_lse = _sequence_forward(
            q[start_q:end_q], k[start_k:end_k], v[start_k:end_k], softmax_scale, mask
        )
        out[start_q:end_q], softmax_lse[:, start_q:end_q] = sequence_out, sequence_lse
    return out.to(q.dtype), softmax_lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64, device=q.device)


def forward_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel of ``flash_attn::_flash_attn_forward``: (out, softmax_lse [B, Hq, Sq], empty S_dmask, rng_state)
    for q [B, Sq, Hq, D] and k/v [B, Sk, Hk, D]."""
    _reject_unsupported(dropout_p, softcap, alibi_slopes, return_softmax)
    batch_size, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    mask = visible_keys(len_q, len_k, causal, window_size_left, window_size_right, q.device)
    outs, lses = zip(*(_sequence_forward(q[b], k[b], v[b], softmax_scale, mask) for b in range(batch_size)))
    out, softmax_lse = torch.stack(outs), torch.stack(lses)
    return out.to(q.dtype), softmax_lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64, device=q.device)


def varlen_backward_cpu(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    """CPU kernel of ``flash_attn::_flash_attn_varlen_backward``: fills the given dq, dk, dv in place (skipping any
    that is None) and returns softmax_d = rowsum(dout * out), float32 [Hq, total_q]."""
    _reject_unsupported(dropout_p, softcap, alibi_slopes)
    dq_full = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_full = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_full = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    softmax_d = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for start_q, end_q, start_k, end_k in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        mask = visible_keys(end_q - start_q, end_k - start_k, causal, window_size_left, window_size_right, q.device)
        rows, keys = slice(start_q, end_q), slice(start_k, end_k)
        dq_full[rows], dk_full[keys], dv_full[keys], softmax_d[:, rows] = _sequence_backward(
            dout[rows], q[rows], k[keys], v[keys], out[rows], softmax_lse[:, rows], softmax_scale, mask
        )
    _write_gradients(dq, dk, dv, dq_full, dk_full, dv_full)
    return softmax_d


def backward_cpu(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CPU kernel of ``flash_attn::_flash_attn_backward``: fills the given dq, dk, dv in place (skipping any that is
    None) and returns softmax_d = rowsum(dout * out), float32 [B, Hq, Sq]."""
    _reject_unsupported(dropout_p, softcap, alibi_slopes)
    mask = visible_keys(q.shape[1], k.shape[1], causal, window_size_left, window_size_right, q.device)
    per_sequence = [
        _sequence_backward(dout[b], q[b], k[b], v[b], out[b], softmax_lse[b], softmax_scale, mask)
        for b in range(q.shape[0])
    ]
    dq_full, dk_full, dv_full, softmax_d = (torch.stack(grads) for grads in zip(*per_sequence))
    _write_gradients(dq, dk, dv, dq_full, dk_full, dv_full)
    return softmax_d


CPU_KERNELS = {
    "flash_attn::_flash_attn_forward": forward_cpu,
    "flash_attn::_flash_attn_varlen_forward": varlen_forward_cpu,
    "flash_attn::_flash_attn_backward": backward_cpu,
    "flash_attn::_flash_attn_varlen_backward": varlen_backward_cpu,
}


def register_cpu_kernels() -> None:
    """Register the four CPU kernels with flash-attn's custom ops (idempotent). Importing
    ``flash_attn.flash_attn_interface`` defines the ops; without CUDA that import needs the CPU backend's finder."""
    global _registered
    if _registered:
        return
    importlib.import_module("flash_attn.flash_attn_interface")  # defines the flash_attn:: custom ops
    for op_name, kernel in CPU_KERNELS.items():
        torch.library.register_kernel(op_name, "cpu", kernel)
    _registered = True
