"""Ring attention: each rank holds a slice of the packed batch; every rank must return the same, right features.

The ring-attention forward itself needs flash-attn's CUDA kernels, so each rank's blocks here output the token
embeddings of its slice (what upstream's ``get_tensor_in_current_ring_attn_rank`` gives it); everything else -
the answer positions, the packed/ring index arithmetic, the hooks, the LM head and the all-reduce over a real
(gloo) process group of two ranks - is the code a GPU run uses.
"""

import os
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


def rank_main(rank: int, folder: str):
    from openrlhf.models.ring_attn_utils import get_tensor_in_current_ring_attn_rank

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=RING)
    sequences, attention_mask, action_mask = batch()
    actor = policy(dist.group.WORLD)
    capture = start_capture(actor, sequences, attention_mask, action_mask)
    packed = sequences[attention_mask.bool()].unsqueeze(0)  # upstream's unpadded (1, nnz) layout
    local, _ = get_tensor_in_current_ring_attn_rank(packed, dist.group.WORLD, 0)
    with torch.no_grad():
        hidden = actor.actor.model.model.embed_tokens(local)
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
    with torch.no_grad():
        h = model.model.embed_tokens(sequences[rows, positions[rows]])
        target = sequences[rows, positions[rows] + 1]
        raw = model.lm_head(h)[torch.arange(3), target]
        normed = model.lm_head(model.model.norm(h))[torch.arange(3), target]
    expected = torch.stack([raw, raw, raw, normed], dim=1)
    for features in results:
        torch.testing.assert_close(features[rows], expected)
        assert torch.isnan(features[2]).all()
    torch.testing.assert_close(results[0], results[1], equal_nan=True)
