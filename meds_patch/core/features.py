"""Layer-wise logits at the answer token (docs/ALGORITHM.md §1), read from a forward pass the trainer already runs."""

import bisect
import functools
from typing import Optional

import torch

# The fallback anchor search looks for the "{" in this many tokens, starting at the token that mentions "boxed"
# (the authors' range(idx, idx + 10)).
FALLBACK_WINDOW = 10
ANCHOR_SEARCHES = ("tokens", "text")


def find_answer_positions(
    sequences: torch.Tensor,
    response_start: torch.Tensor,
    tokenizer,
    anchor: str = "\\boxed{",
    attention_mask: Optional[torch.Tensor] = None,
    search: str = "tokens",
) -> torch.LongTensor:
    """Return, per row, the position p of the token that ends the last ``anchor`` in the response, or -1.

    ``sequences`` is (B, T) token ids, ``response_start`` (B,) the index of each row's first response token.
    A row ends at the last 1 of ``attention_mask`` if given, else before its trailing pad tokens (right padding).
    When the anchor's exact token ids are absent, the last response token whose text contains "boxed" is
    found and p is the first token from it through the next 9 whose text contains "{"; when those 10 tokens
    hold no "{", the next earlier "boxed" token is tried (the authors' search, ``search="tokens"``).

    ``search="text"`` instead decodes the response and takes the token that ends the last ``anchor`` in that
    text, however the tokenizer split it (" \\boxed{" in running text encodes differently from "\\boxed{" in
    byte-level BPEs, so the token search can prefer an earlier exact box); no fallback. A row gets -1 when
    nothing matches or when p is its last token (there is no answer token to read).
    """
    if search not in ANCHOR_SEARCHES:
        raise ValueError(f"search must be one of {ANCHOR_SEARCHES}, got {search!r}")
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be (B, T), got shape {tuple(sequences.shape)}")
    seq = sequences.detach().cpu().long()
    batch, length = seq.shape
    start = torch.as_tensor(response_start).detach().cpu().long().reshape(-1)
    if start.numel() != batch:
        raise ValueError(f"response_start has {start.numel()} entries for {batch} sequences")
    if (start < 0).any():
        raise ValueError(f"response_start must be >= 0, got {start[start < 0][:3].tolist()}")
    if length == 0:
        return torch.full((batch,), -1, dtype=torch.long)  # no tokens, no answer
    cols = torch.arange(length)
    if attention_mask is not None:
        valid = attention_mask.detach().cpu().bool()
    elif tokenizer.pad_token_id is not None:
        not_pad = (seq != tokenizer.pad_token_id).long()
        # Only trailing pads are padding; a pad id inside the text (pad == eos in some tokenizers) is kept.
        last_real = torch.where(not_pad.any(1), length - 1 - not_pad.flip(1).argmax(1), -1)
        valid = cols[None, :] <= last_real[:, None]
    else:
        valid = torch.ones_like(seq, dtype=torch.bool)
    end = torch.where(valid.any(1), length - valid.flip(1).long().argmax(1), 0)  # one past the last real token
    search_rows = {"tokens": token_search, "text": text_search}[search]
    positions = search_rows(seq, start, end, tokenizer, anchor)
    # The answer token p + 1 must exist.
    return torch.where(positions + 1 < end, positions, torch.full_like(positions, -1))


def text_search(seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, tokenizer, anchor: str) -> torch.Tensor:
    """Per row, the token that ends the last ``anchor`` in the decoded response ``seq[row, start:end]``, or -1."""
    if not anchor:
        raise ValueError("anchor must be a non-empty string")
    positions = torch.full((len(seq),), -1, dtype=torch.long)
    responses = [seq[row, start[row] : end[row]].tolist() for row in range(len(seq))]
    for row, (ids, text) in enumerate(zip(responses, tokenizer.batch_decode(responses))):
        if anchor not in text:
            continue
        # Decoding a whole response per probe costs about a millisecond per thousand tokens, and the answer
        # sits near the end: widen a window back from the end until its text holds the anchor.
        window = 16
        while anchor not in tokenizer.decode(ids[-window:]):
            window *= 2
        tail = ids[-window:]
        # Where the last anchor starts: the last token whose suffix text still holds it. Where it ends: the
        # first token at which the text from there holds it. Decoding keeps the tokenizer's own spacing.
        first = bisect.bisect_left(range(len(tail)), True, key=lambda j: anchor not in tokenizer.decode(tail[j:]))
        first -= 1
        last = bisect.bisect_left(
            range(first, len(tail)), True, key=lambda j: anchor in tokenizer.decode(tail[first : j + 1])
        )
        positions[row] = end[row] - len(tail) + first + last
    return positions


def token_search(seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, tokenizer, anchor: str) -> torch.Tensor:
    """Per row, the last token of the last exact ``anchor`` token sequence in the response, else the authors'
    fallback (a "{" within FALLBACK_WINDOW tokens from a "boxed" token, latest first), else -1."""
    batch, length = seq.shape
    cols = torch.arange(length)
    in_response = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    anchor_ids = torch.tensor(tokenizer.encode(anchor, add_special_tokens=False), dtype=torch.long)
    if anchor_ids.numel() == 0:
        raise ValueError(f"anchor {anchor!r} encodes to no tokens")
    width = anchor_ids.numel()
    positions = torch.full((batch,), -1, dtype=torch.long)
    if length >= width:
        # Match windows [j, j + width) and require the whole window inside the response; p = j + width - 1.
        hits = (seq.unfold(1, width, 1) == anchor_ids).all(-1)
        hits &= in_response[:, : length - width + 1] & in_response[:, width - 1 :]
        last_hit = length - width - hits.flip(1).long().argmax(1)
        positions = torch.where(hits.any(1), last_hit + width - 1, positions)

    missing = positions < 0
    if missing.any():
        # Vectorised over the batch: which vocabulary entries decode to text containing "boxed" or "{".
        has_boxed, has_brace = _vocabulary_flags(tokenizer)
        known = seq < len(has_boxed)  # a model's vocabulary can be padded beyond the tokenizer's
        ids = torch.where(known, seq, 0)
        boxed = has_boxed[ids] & known & in_response & missing[:, None]
        brace = has_brace[ids] & known & in_response
        # next_brace[j]: the first "{" at or after j (length if none), by a reversed running minimum.
        next_brace = torch.where(brace, cols, length).flip(1).cummin(1).values.flip(1)
        # The last "boxed" token with a "{" inside its window wins; a window without one passes to earlier boxes.
        usable = boxed & (next_brace - cols[None, :] < FALLBACK_WINDOW)
        last_usable = length - 1 - usable.flip(1).long().argmax(1)
        found = next_brace.gather(1, last_usable[:, None]).squeeze(1)
        positions = torch.where(usable.any(1), found, positions)
    return positions


@functools.lru_cache(maxsize=8)
def _vocabulary_flags(tokenizer) -> tuple:
    """Per token id: does its decoded text contain "boxed", does it contain "{". Decoding the vocabulary once
    beats decoding every response token of every rollout (thousands per row) on each forward."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor(["boxed" in t for t in texts]), torch.tensor(["{" in t for t in texts])


def decoder_parts(model: torch.nn.Module):
    """Return (blocks, final_norm, lm_head) of a Hugging Face causal LM, through DeepSpeed and PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):  # DeepSpeed engine / DDP
        model = model.module
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    blocks, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if blocks is None or norm is None or lm_head is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder .layers/.norm and lm_head: MEDS cannot read its layers"
        )
    return blocks, norm, lm_head


class AnswerHiddenStates:
    """Forward hooks on the last K blocks that keep each block's output only at the given flat token indices.

    ``flat_index`` indexes the hooked hidden states flattened to (batch * seq, H); -1 keeps nothing for that row.
    Use as a context manager around the model's own forward, then call ``logits``. The hooks only fire on a
    forward whose hidden states hold ``num_tokens`` positions, so a left-over hook can never touch another pass.
    """

    def __init__(self, model: torch.nn.Module, flat_index: torch.Tensor, num_tokens: int, num_layers: int):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.blocks, self.norm, self.lm_head = decoder_parts(model)
        self.blocks = self.blocks[-num_layers:]
        self.flat_index = flat_index
        self.num_tokens = num_tokens
        self.states: list = [None] * len(self.blocks)
        self.handles: list = []

    def __enter__(self) -> "AnswerHiddenStates":
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(self._keeper(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _keeper(self, i: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[:-1].numel() != self.num_tokens:
                return
            flat = hidden.reshape(-1, hidden.shape[-1])
            index = self.flat_index.to(flat.device)
            self.states[i] = flat[index.clamp(min=0)].detach()

        return hook

    @torch.no_grad()
    def logits(self, target_ids: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 logits of ``target_ids`` read through the LM head (final norm on the last block only)."""
        if any(s is None for s in self.states):
            raise RuntimeError("AnswerHiddenStates.logits called before a forward pass ran through the hooked blocks")
        # Call the modules rather than read their weights, so ZeRO-3 gathers the partitioned parameters.
        states = torch.stack(self.states[:-1] + [self.norm(self.states[-1])], dim=1)  # (B, K, H)
        logits = self.lm_head(states)  # (B, K, V)
        target = target_ids.to(logits.device).clamp(min=0).view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        values = logits.gather(-1, target).squeeze(-1).float()
        return values.masked_fill((self.flat_index < 0).to(values.device).view(-1, 1), float("nan"))


@torch.no_grad()
def layer_logit_features(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    num_layers: int = 14,
) -> torch.Tensor:
    """Run ``model`` once and return (B, K) float32 MEDS features: for each of the last K blocks (shallow to deep),
    the logit of the token at p + 1 read from the block's output at p (rows with p = -1 are NaN).

    Intermediate blocks go through ``lm_head`` raw (a plain logit lens); the last block through the final norm and
    ``lm_head``, i.e. the model's own output logit. Hidden states are kept only at p, never for whole sequences.
    """
    batch, length = sequences.shape
    positions = positions.to(sequences.device).long()
    if positions.shape != (batch,):
        raise ValueError(f"positions must be ({batch},), one per row, got shape {tuple(positions.shape)}")
    bad = (positions < -1) | (positions > length - 2)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"positions[{row}] = {int(positions[row])} is not a token with an answer token after it in a row of "
            f"{length} tokens (use -1 for a row without an answer)"
        )
    rows = torch.arange(batch, device=sequences.device)
    flat_index = torch.where(positions >= 0, rows * length + positions, -1)
    target = sequences[rows, (positions + 1).clamp(min=0)]
    with AnswerHiddenStates(model, flat_index, batch * length, num_layers) as captured:
        model(input_ids=sequences, attention_mask=attention_mask)
    return captured.logits(target)
