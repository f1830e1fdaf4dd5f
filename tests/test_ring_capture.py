"""Ring attention: each rank holds a slice of the packed batch; every rank must return the same, right features.

Each rank's blocks here output a stand-in hidden state for its slice of the packed batch (what upstream's
``get_tensor_in_current_ring_attn_rank`` gives it): the token's embedding plus a code of its position in the whole
packed sequence, so a slice offset that lands on another row's answer (three rows end with the same anchor) gives
other values. Everything else - the answer positions, the packed/ring index arithmetic, the hooks, the LM head and
the all-reduce over a real (gloo) process group of two ranks - is the code a GPU run uses.
"""

import os
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meds_patch.core.config import MEDSConfig
from meds_patch.cpu.tiny_math import tiny_model, tiny_tokenizer
from meds_patch.integration.glue import TrainerOptions, finish_capture, start_capture

RING = 2


def batch():
    tok = tiny_tokenizer()
    prompt = tok.encode("what is 2 + 3?", add_special_tokens=False)
    answers = [" x = \\boxed{5}", " so 2 + 3 = 5 and the answer is \\boxed{5}.", " no box", " \\boxed{7}"]
    rows = [prompt + tok.encode(a, add_special_tokens=False) for a in answers]
    length = max(map(len, rows))
    sequences = torch.tensor([r + [tok.pad_token_id] * (length - len(r)) for r in rows])
    attention_mask = (sequences != tok.pad_token_id).long()
    action_mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    action_mask[:, len(prompt) - 1 :] = attention_mask[:, len(prompt) :].bool()
    return sequences, attention_mask, action_mask


def policy(ring_group):
    meds = SimpleNamespace(enable=True, **vars(MEDSConfig(num_layers=4)), **vars(TrainerOptions()))
    args = SimpleNamespace(algo=SimpleNamespace(meds=meds), ds=SimpleNamespace(packing_samples=True))
    model = tiny_model(tiny_tokenizer(), num_layers=4)
    return SimpleNamespace(strategy=SimpleNamespace(args=args, ring_attn_group=ring_group), tokenizer=tiny_tokenizer(),
                           actor=SimpleNamespace(model=model))  # fmt: skip


def stand_in_hidden(model, tokens: torch.Tensor, packed_positions: torch.Tensor) -> torch.Tensor:
    """(..., H): each token's embedding plus a sinusoid of its position in the packed sequence."""
    width = model.config.hidden_size
    angles = packed_positions.unsqueeze(-1).float() / 10 ** (torch.arange(width) / width)
    return model.model.embed_tokens(tokens) + torch.sin(angles)


def rank_main(rank: int, folder: str, failing_rank: int = -1):
    from openrlhf.models.ring_attn_utils import get_tensor_in_current_ring_attn_rank

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=RING)
    sequences, attention_mask, action_mask = batch()
    actor = policy(dist.group.WORLD)
    capture = start_capture(actor, sequences, attention_mask, action_mask)
    if rank == failing_rank:  # as if the hooks' token-count check never matched on this rank
        capture.hidden.num_tokens += 1
    packed = sequences[attention_mask.bool()].unsqueeze(0)  # upstream's unpadded (1, nnz) layout
    local, _ = get_tensor_in_current_ring_attn_rank(packed, dist.group.WORLD, 0)
    local_positions, _ = get_tensor_in_current_ring_attn_rank(
        torch.arange(packed.shape[1]).unsqueeze(0), dist.group.WORLD, 0
    )
    with torch.no_grad():
        hidden = stand_in_hidden(actor.actor.model, local, local_positions)
        for block in capture.hidden.blocks:
            for hook in list(block._forward_hooks.values()):
                hook(block, (), hidden)
    torch.save(finish_capture(actor, capture), os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_every_ring_rank_returns_the_features_of_the_whole_batch(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path),), nprocs=RING, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(RING)]

    sequences, attention_mask, action_mask = batch()
    from meds_patch import find_answer_positions

    start = action_mask.long().argmax(1) + 1
    positions = find_answer_positions(sequences, start, tiny_tokenizer(), attention_mask=attention_mask)
    assert positions.tolist()[2] == -1 and (positions[[0, 1, 3]] >= 0).all()
    model = tiny_model(tiny_tokenizer(), num_layers=4)
    rows = torch.tensor([0, 1, 3])
    # Row r's answer sits after the attended tokens of the rows before it, in the packed sequence.
    lengths = attention_mask.sum(1)
    packed_positions = torch.tensor([int(lengths[:r].sum()) + int(positions[r]) for r in rows.tolist()])
    slice_size = (int(lengths.sum()) + RING - 1) // RING
    assert {int(p) // slice_size for p in packed_positions} == {0, 1}  # answers on both ranks
    with torch.no_grad():
        h = stand_in_hidden(model, sequences[rows, positions[rows]], packed_positions)
        target = sequences[rows, positions[rows] + 1]
        raw = model.lm_head(h)[torch.arange(3), target]
        normed = model.lm_head(model.model.norm(h))[torch.arange(3), target]
    expected = torch.stack([raw, raw, raw, normed], dim=1)
    for features in results:
        torch.testing.assert_close(features[rows], expected)
        assert torch.isnan(features[2]).all()
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


def test_a_capture_failure_on_one_ring_rank_is_reported_by_every_rank_without_a_hang(tmp_path):
    context = mp.spawn(rank_main, args=(str(tmp_path), 1), nprocs=RING, join=False)
    deadline = time.time() + 120
    while not context.join(timeout=5):
        assert time.time() < deadline, "the ring ranks did not finish within 120 s"
    failing, peer = (torch.load(tmp_path / f"rank{r}.pt") for r in (1, 0))
    assert failing.startswith("MEDS: the feature capture failed on policy rank 1: no forward of")
    assert peer == (
        "MEDS: the feature capture failed on 1 ring-attention peer(s) of policy rank 0 (the failing rank's log gives "
        "the reason)"
    )
