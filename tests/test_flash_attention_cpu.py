"""The CPU kernels of flash-attn's custom ops against an independent reference: float64 scaled_dot_product_attention
with a hand-built boolean mask per sequence (flash-attn's bottom-right causal alignment), kv heads repeated for GQA."""

import pytest
import torch
import torch.nn.functional as F

from meds_patch.cpu import backend

backend.install()  # supplies the missing compiled flash_attn_2_cuda module on a machine without CUDA

from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward  # noqa: E402

from meds_patch.cpu.flash_attention import register_cpu_kernels  # noqa: E402

register_cpu_kernels()

HEAD_DIM = 8
SCALE = HEAD_DIM**-0.5


def hand_built_mask(len_q, len_k, causal, window=(-1, -1)):
    """True where query i may see key j; query i sits at key position i + len_k - len_q (bottom-right)."""
    left, right = window
    if causal:
        right = 0

    def visible(i, j):
        position = i + len_k - len_q
        return (right < 0 or j <= position + right) and (left < 0 or j >= position - left)

    return torch.tensor([[visible(i, j) for j in range(len_k)] for i in range(len_q)], dtype=torch.bool)


def reference_sequence(q, k, v, mask=None, **sdpa_options):
    """One sequence, q [Lq, Hq, D], k/v [Lk, Hk, D], in float64 through sdpa."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE, **sdpa_options).transpose(0, 1)


def reference_varlen(q, k, v, lens_q, lens_k, causal, window=(-1, -1)):
    outs, start_q, start_k = [], 0, 0
    for len_q, len_k in zip(lens_q, lens_k):
        mask = hand_built_mask(len_q, len_k, causal, window)
        outs.append(
            reference_sequence(
                q[start_q : start_q + len_q], k[start_k : start_k + len_k], v[start_k : start_k + len_k], mask
            )
        )
        start_q, start_k = start_q + len_q, start_k + len_k
    return torch.cat(outs)


def cu_seqlens(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def packed_inputs(lens_q, lens_k, heads_q=4, heads_k=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads_q, HEAD_DIM, generator=generator)
    k = torch.randn(sum(lens_k), heads_k, HEAD_DIM, generator=generator)
    v = torch.randn(sum(lens_k), heads_k, HEAD_DIM, generator=generator)
    dout = torch.randn(sum(lens_q), heads_q, HEAD_DIM, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def reference_grads(q, k, v, dout, attention):
    """Gradients of sum(attention(q, k, v) * dout) with respect to float64 copies of q, k, v."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves)
    out.backward(dout.double())
    return out.detach(), [leaf.grad for leaf in leaves]


def varlen_func(q, k, v, lens_q, lens_k, causal, **options):
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), causal=causal, **options
    )


def flash_grads(q, k, v, dout, attention):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves)
    out.backward(dout)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, tolerance):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tolerance, rtol=tolerance)


def test_varlen_func_matches_reference_for_packed_causal_gqa_sequences():
    lens = [5, 3, 7]
    q, k, v, dout = packed_inputs(lens, lens)
    out, grads = flash_grads(q, k, v, dout, lambda q, k, v: varlen_func(q, k, v, lens, lens, causal=True))
    expected_out, expected_grads = reference_grads(
        q, k, v, dout, lambda q, k, v: reference_varlen(q, k, v, lens, lens, causal=True)
    )
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert_close(out, expected_out, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5)


def test_varlen_func_in_bfloat16_matches_reference_loosely():
    lens = [5, 3, 7]
    q, k, v, dout = packed_inputs(lens, lens, dtype=torch.bfloat16)
    out, grads = flash_grads(q, k, v, dout, lambda q, k, v: varlen_func(q, k, v, lens, lens, causal=True))
    expected_out, expected_grads = reference_grads(
        q, k, v, dout, lambda q, k, v: reference_varlen(q, k, v, lens, lens, causal=True)
    )
    assert out.dtype == torch.bfloat16 and all(grad.dtype == torch.bfloat16 for grad in grads)
    assert_close(out, expected_out, 3e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 5e-2)


def test_causal_mask_is_bottom_right_aligned_when_keys_outnumber_queries():
    lens_q, lens_k = [3, 3], [7, 7]
    q, k, v, _ = packed_inputs(lens_q, lens_k)
    out = varlen_func(q, k, v, lens_q, lens_k, causal=True)
    assert_close(out, reference_varlen(q, k, v, lens_q, lens_k, causal=True), 1e-5)

    # torch's is_causal is top-left aligned: query 0 would see key 0 only instead of keys 0..4.
    top_left = torch.cat(
        [
            reference_sequence(q[:3], k[:7], v[:7], is_causal=True),
            reference_sequence(q[3:], k[7:], v[7:], is_causal=True),
        ]
    )
    assert not torch.allclose(out.double(), top_left, atol=1e-3)


def test_private_varlen_forward_returns_logsumexp_of_scaled_masked_scores():
    lens_q, lens_k = [4, 2, 6], [6, 2, 6]
    q, k, v, _ = packed_inputs(lens_q, lens_k)
    out, lse, _, _ = _flash_attn_varlen_forward(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), 0.0, SCALE, True
    )
    expected, start_q, start_k = [], 0, 0
    for len_q, len_k in zip(lens_q, lens_k):
        q_s = q[start_q : start_q + len_q].double().transpose(0, 1)
        k_s = k[start_k : start_k + len_k].double().transpose(0, 1).repeat_interleave(2, dim=0)
        scores = SCALE * q_s @ k_s.transpose(-1, -2)
        expected.append(torch.logsumexp(scores.masked_fill(~hand_built_mask(len_q, len_k, True), float("-inf")), -1))
        start_q, start_k = start_q + len_q, start_k + len_k
    assert lse.dtype == torch.float32 and lse.shape == (4, sum(lens_q))
    assert_close(lse, torch.cat(expected, dim=1), 1e-5)


def test_private_varlen_backward_fills_gradients_in_place_and_returns_softmax_d():
    lens_q, lens_k = [4, 2, 6], [6, 2, 6]
    q, k, v, dout = packed_inputs(lens_q, lens_k)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, _, rng_state = _flash_attn_varlen_forward(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, SCALE, True
    )
    dq, dk, dv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    softmax_d = _flash_attn_varlen_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        cu_q,
        cu_k,
        max(lens_q),
        max(lens_k),
        0.0,
        SCALE,
        True,
        -1,
        -1,
        0.0,
        None,
        False,
        rng_state,
    )
    _, expected_grads = reference_grads(
        q, k, v, dout, lambda q, k, v: reference_varlen(q, k, v, lens_q, lens_k, causal=True)
    )
    for grad, expected_grad in zip((dq, dk, dv), expected_grads):
        assert_close(grad, expected_grad, 1e-5)
    assert softmax_d.dtype == torch.float32
    assert_close(softmax_d, (dout * out).sum(-1).transpose(0, 1), 1e-5)


def test_private_varlen_backward_skips_gradients_passed_as_none():
    lens = [3, 4]
    q, k, v, dout = packed_inputs(lens, lens)
    cu = cu_seqlens(lens)
    out, lse, _, _ = _flash_attn_varlen_forward(q, k, v, cu, cu, 4, 4, 0.0, SCALE, True)
    dk = torch.zeros_like(k)
    _flash_attn_varlen_backward(
        dout, q, k, v, out, lse, None, dk, None, cu, cu, 4, 4, 0.0, SCALE, True, -1, -1, 0.0, None, False
    )
    _, (_, expected_dk, _) = reference_grads(
        q, k, v, dout, lambda q, k, v: reference_varlen(q, k, v, lens, lens, True)
    )
    assert_close(dk, expected_dk, 1e-5)


def test_private_varlen_backward_uses_given_out_and_lse_as_ring_attention_does():
    # Ring attention: each query block attends to an earlier key block (no mask) and to its own block (causal),
    # merges the two outputs through their lse, and runs each block's backward with the merged out and lse.
    lens, lens_earlier = [4, 3], [5, 2]
    q, k_own, v_own, dout = packed_inputs(lens, lens, seed=3)
    _, k_earlier, v_earlier, _ = packed_inputs(lens, lens_earlier, seed=4)
    cu, cu_earlier = cu_seqlens(lens), cu_seqlens(lens_earlier)
    blocks = [(k_earlier, v_earlier, cu_earlier, max(lens_earlier), False), (k_own, v_own, cu, max(lens), True)]
    (out_earlier, lse_earlier, _, _), (out_own, lse_own, _, _) = (
        _flash_attn_varlen_forward(q, k, v, cu, cu_k, max(lens), max_k, 0.0, SCALE, causal)
        for k, v, cu_k, max_k, causal in blocks
    )
    lse = torch.logaddexp(lse_earlier, lse_own)
    out = sum(
        torch.exp(block_lse - lse).T[..., None] * o
        for block_lse, o in ((lse_earlier, out_earlier), (lse_own, out_own))
    )

    dq_total, dk_dv = torch.zeros_like(q), []
    for k, v, cu_k, max_k, causal in blocks:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cu,
            cu_k,
            max(lens),
            max_k,
            0.0,
            SCALE,
            causal,
            -1,
            -1,
            0.0,
            None,
            False,
        )
        dq_total += dq
        dk_dv.append((dk, dv))

    def full_attention(q, k_earlier, v_earlier, k_own, v_own):
        # each sequence's keys are its earlier block then its own block; bottom-right causal over the concatenation
        outs = []
        for s in range(len(lens)):
            q_rows, own, earlier = (slice(c[s], c[s + 1]) for c in (cu, cu, cu_earlier))
            k = torch.cat([k_earlier[earlier], k_own[own]])
            v = torch.cat([v_earlier[earlier], v_own[own]])
            outs.append(reference_sequence(q[q_rows], k, v, hand_built_mask(lens[s], lens_earlier[s] + lens[s], True)))
        return torch.cat(outs)

    leaves = [x.double().requires_grad_() for x in (q, k_earlier, v_earlier, k_own, v_own)]
    expected_out = full_attention(*leaves)
    expected_out.backward(dout.double())
    assert_close(out, expected_out.detach(), 1e-5)
    for grad, leaf in zip((dq_total, *dk_dv[0], *dk_dv[1]), leaves):
        assert_close(grad, leaf.grad, 1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
def test_fixed_length_func_matches_reference_with_gqa(causal):
    batch, len_q, len_k = 2, 5, 7
    q, k, v, dout = packed_inputs([batch * len_q], [batch * len_k], seed=1)
    q, dout = q.view(batch, len_q, 4, HEAD_DIM), dout.view(batch, len_q, 4, HEAD_DIM)
    k, v = k.view(batch, len_k, 2, HEAD_DIM), v.view(batch, len_k, 2, HEAD_DIM)
    mask = hand_built_mask(len_q, len_k, causal)

    def reference(q, k, v):
        return torch.stack([reference_sequence(q[b], k[b], v[b], mask) for b in range(batch)])

    out, grads = flash_grads(q, k, v, dout, lambda q, k, v: flash_attn_func(q, k, v, causal=causal))
    expected_out, expected_grads = reference_grads(q, k, v, dout, reference)
    assert_close(out, expected_out, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5)


@pytest.mark.parametrize("causal, window", [(False, (2, 1)), (True, (2, -1))], ids=["two_sided", "causal_left"])
def test_sliding_window_matches_reference(causal, window):
    lens = [6, 4]
    q, k, v, dout = packed_inputs(lens, lens, seed=2)
    out, grads = flash_grads(
        q, k, v, dout, lambda q, k, v: varlen_func(q, k, v, lens, lens, causal=causal, window_size=window)
    )
    expected_out, expected_grads = reference_grads(
        q, k, v, dout, lambda q, k, v: reference_varlen(q, k, v, lens, lens, causal, window)
    )
    assert_close(out, expected_out, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5)


def test_query_without_visible_keys_gets_zero_output_and_infinite_lse():
    # With 2 keys for 4 queries, bottom-right causal leaves queries 0 and 1 without any key.
    lens_q, lens_k = [4], [2]
    q, k, v, dout = packed_inputs(lens_q, lens_k)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, _, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 4, 2, 0.0, SCALE, True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.isinf(lse[:, :2]).all() and (lse[:, :2] > 0).all()
    assert torch.isfinite(lse[:, 2:]).all()
    assert_close(out[2:], reference_sequence(q[2:], k, v, hand_built_mask(2, 2, True)), 1e-5)

    _, grads = flash_grads(q, k, v, dout, lambda q, k, v: varlen_func(q, k, v, lens_q, lens_k, causal=True))
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert torch.equal(grads[0][:2], torch.zeros_like(grads[0][:2]))


@pytest.mark.parametrize(
    "option, value",
    [("dropout_p", 0.1), ("softcap", 30.0), ("alibi_slopes", torch.ones(4))],
    ids=["dropout_p", "softcap", "alibi_slopes"],
)
def test_unsupported_option_raises_not_implemented_naming_it(option, value):
    lens = [3]
    q, k, v, _ = packed_inputs(lens, lens)
    with pytest.raises(NotImplementedError, match=f"{option}.*not supported by the MEDS CPU"):
        varlen_func(q, k, v, lens, lens, causal=True, **{option: value})


def test_register_cpu_kernels_twice_is_harmless():
    register_cpu_kernels()
    register_cpu_kernels()
    lens = [3]
    q, k, v, _ = packed_inputs(lens, lens)
    assert_close(varlen_func(q, k, v, lens, lens, causal=True), reference_varlen(q, k, v, lens, lens, True), 1e-5)
