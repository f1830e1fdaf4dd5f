"""docs/ALGORITHM.md §1: the answer position and the layer-wise logits read at it."""

import pytest
import torch

from meds_patch import find_answer_positions, layer_logit_features
from meds_patch.cpu.tiny_math import tiny_model, tiny_tokenizer


def encode(text: str) -> list:
    return tiny_tokenizer().encode(text, add_special_tokens=False)


ANCHOR = encode("\\boxed{")


def right_pad(rows):
    pad = tiny_tokenizer().pad_token_id
    length = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (length - len(r)) for r in rows])


def test_position_is_the_last_token_of_the_exact_anchor():
    prompt, before = encode("what is 1 + 2?"), encode(" so x =")
    seq = prompt + before + ANCHOR + encode("3}")
    positions = find_answer_positions(torch.tensor([seq]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [len(prompt) + len(before) + len(ANCHOR) - 1]


def test_last_occurrence_wins():
    prompt = encode("q?")
    first = ANCHOR + encode("1} or")
    seq = prompt + first + ANCHOR + encode("2}")
    positions = find_answer_positions(torch.tensor([seq]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [len(prompt) + len(first) + len(ANCHOR) - 1]


def test_anchor_in_the_prompt_is_ignored():
    prompt = encode("put it in") + ANCHOR + encode("}")
    seq = prompt + encode(" no box here")
    positions = find_answer_positions(torch.tensor([seq]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [-1]


def test_anchor_on_the_last_token_gives_no_position():
    prompt = encode("q?")
    seq = prompt + encode(" a") + ANCHOR
    positions = find_answer_positions(torch.tensor([seq]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [-1]


def test_right_padded_rows_use_their_own_end():
    prompt = encode("q?")
    long_row = prompt + encode(" the answer is 12 + 3 = 15") + ANCHOR + encode("15}")
    short_row = prompt + ANCHOR  # anchor is the last real token: nothing to read after it
    mid_row = prompt + ANCHOR + encode("4}")
    batch = right_pad([long_row, short_row, mid_row])
    positions = find_answer_positions(batch, torch.tensor([len(prompt)] * 3), tiny_tokenizer())
    assert positions.tolist() == [len(long_row) - len(encode("15}")) - 1, -1, len(prompt) + len(ANCHOR) - 1]


def test_attention_mask_sets_the_row_end():
    prompt = encode("q?")
    seq = prompt + ANCHOR + encode("4}")
    mask = torch.ones(1, len(seq), dtype=torch.long)
    mask[0, len(prompt) + len(ANCHOR) :] = 0  # the answer token lies beyond the end
    positions = find_answer_positions(
        torch.tensor([seq]), torch.tensor([len(prompt)]), tiny_tokenizer(), attention_mask=mask
    )
    assert positions.tolist() == [-1]


def test_fallback_finds_the_brace_after_a_boxed_token_when_the_exact_ids_are_absent():
    # In running text "\boxed{" tokenizes as ' \\', 'boxed', '{' -- not the ids of the bare anchor.
    prompt = encode("q?")
    response = encode(" so the answer is \\boxed{42}.")
    assert ANCHOR not in [response[i : i + len(ANCHOR)] for i in range(len(response))]
    texts = [tiny_tokenizer().decode([t]) for t in response]
    expected = len(prompt) + texts.index("{")
    positions = find_answer_positions(torch.tensor([prompt + response]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [expected]


def test_exact_and_fallback_rows_mix_in_one_batch():
    prompt = encode("q?")
    exact = prompt + encode(" x =") + ANCHOR + encode("3}")
    running = prompt + encode(" so the answer is \\boxed{42}.")
    texts = [tiny_tokenizer().decode([t]) for t in running]
    positions = find_answer_positions(right_pad([exact, running]), torch.tensor([len(prompt)] * 2), tiny_tokenizer())
    assert positions.tolist() == [len(prompt) + len(encode(" x =")) + len(ANCHOR) - 1, texts.index("{")]


def test_fallback_window_is_the_boxed_token_and_the_nine_after_it():
    # The authors' range(idx, idx + 10): a "{" 9 tokens after "boxed" is found, one 10 tokens after is not.
    prompt = encode("q?")
    inside = prompt + encode(" boxed") + encode(" 1") * 8 + encode("{2}")
    outside = prompt + encode(" boxed") + encode(" 1") * 9 + encode("{2}")
    positions = find_answer_positions(right_pad([inside, outside]), torch.tensor([len(prompt)] * 2), tiny_tokenizer())
    assert positions.tolist() == [len(prompt) + len(encode(" boxed")) + 8, -1]


def test_fallback_goes_back_to_an_earlier_boxed_token_when_the_last_has_no_brace():
    prompt = encode("q?")
    first = encode(" boxed") + encode("{7}")
    response = first + encode(" then boxed") + encode(" 1") * 10
    positions = find_answer_positions(torch.tensor([prompt + response]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [len(prompt) + len(encode(" boxed"))]


def test_no_box_gives_minus_one():
    prompt = encode("q?")
    seq = prompt + encode(" the answer is 4.")
    positions = find_answer_positions(torch.tensor([seq]), torch.tensor([len(prompt)]), tiny_tokenizer())
    assert positions.tolist() == [-1]


# A bare first box matches the anchor's ids exactly; the final box, in running text, does not.
FIRST_BOX, BETWEEN, FINAL_BOX = ANCHOR + encode("1}"), encode(" so the answer is \\boxed{"), encode("3}.")


def find(rows, search, prompt_len=2):
    return find_answer_positions(
        right_pad(rows), torch.tensor([prompt_len] * len(rows)), tiny_tokenizer(), search=search
    )


def test_token_search_prefers_an_exact_earlier_box_to_a_final_box_in_running_text():
    prompt = encode("q?")
    assert find([prompt + FIRST_BOX + BETWEEN + FINAL_BOX], "tokens", len(prompt)).tolist() == [
        len(prompt) + len(ANCHOR) - 1
    ]


def test_text_search_reads_the_final_box_in_the_decoded_text():
    prompt = encode("q?")
    assert find([prompt + FIRST_BOX + BETWEEN + FINAL_BOX], "text", len(prompt)).tolist() == [
        len(prompt) + len(FIRST_BOX) + len(BETWEEN) - 1
    ]


def test_text_search_ends_at_the_token_holding_the_anchors_last_character():
    # "answer is" spans the tokens ' answer' and ' is' and starts inside ' answer': p is ' is'.
    prompt, before, after = encode("q?"), encode(" so the answer is"), encode(" 4, done")
    assert [tiny_tokenizer().decode([t]) for t in before[-2:]] == [" answer", " is"]
    positions = find_answer_positions(
        torch.tensor([prompt + before + after]),
        torch.tensor([len(prompt)]),
        tiny_tokenizer(),
        "swer is",
        search="text",
    )
    assert positions.tolist() == [len(prompt) + len(before) - 1]


def test_text_search_finds_an_anchor_far_from_the_end():
    prompt, head, tail = encode("q?"), encode(" so \\boxed{"), encode(" 1 + 2 = 3") * 12
    assert len(tail) > 32  # past the first windows of the search back from the end
    assert find([prompt + head + tail], "text", len(prompt)).tolist() == [len(prompt) + len(head) - 1]


def test_text_search_ignores_the_prompt_and_needs_an_answer_token():
    prompt = encode("put it in") + ANCHOR + encode("}")
    no_box, box_last = prompt + encode(" no box here"), prompt + encode(" so") + ANCHOR
    assert find([no_box, box_last], "text", len(prompt)).tolist() == [-1, -1]


def test_unknown_search_is_rejected():
    with pytest.raises(ValueError, match=r"search must be one of \('tokens', 'text'\), got 'regex'"):
        find([encode("q? \\boxed{1}")], "regex")


def reference_features(model, sequences, attention_mask, positions, num_layers):
    """What the spec defines, computed the expensive way through output_hidden_states."""
    with torch.no_grad():
        hidden = model(input_ids=sequences, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    lm_head = model.get_output_embeddings()
    rows = torch.arange(len(sequences))
    target = sequences[rows, positions + 1]
    k = min(num_layers, len(hidden) - 1)
    values = [lm_head(h[rows, positions])[rows, target] for h in hidden[-k:]]  # last entry is already normed
    return torch.stack(values, dim=1).float()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("num_layers", [2, 14])
def test_features_equal_logit_lens_of_output_hidden_states(arch, num_layers):
    model = tiny_model(tiny_tokenizer(), arch, num_layers=4)
    prompt = encode("what is 3 + 4?")
    rows = [prompt + encode(" x") + ANCHOR + encode("7}"), prompt + encode(" 3 + 4 = 7 so") + ANCHOR + encode("7}.")]
    sequences = right_pad(rows)
    attention_mask = (sequences != tiny_tokenizer().pad_token_id).long()
    positions = find_answer_positions(sequences, torch.tensor([len(prompt)] * 2), tiny_tokenizer())
    assert (positions >= 0).all()

    features = layer_logit_features(model, sequences, attention_mask, positions, num_layers=num_layers)

    expected = reference_features(model, sequences, attention_mask, positions, num_layers)
    assert features.dtype == torch.float32
    assert features.shape == (2, min(num_layers, 4))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_last_feature_is_the_models_own_output_logit():
    model = tiny_model(tiny_tokenizer(), "qwen2")
    prompt = encode("q?")
    seq = torch.tensor([prompt + ANCHOR + encode("5}")])
    position = len(prompt) + len(ANCHOR) - 1
    features = layer_logit_features(model, seq, torch.ones_like(seq), torch.tensor([position]))
    with torch.no_grad():
        logits = model(input_ids=seq).logits
    assert features[0, -1].item() == pytest.approx(logits[0, position, seq[0, position + 1]].item(), abs=1e-5)


def test_rows_without_position_are_nan():
    model = tiny_model(tiny_tokenizer(), "qwen2")
    seq = right_pad([encode("q? no box at all"), encode("q?") + ANCHOR + encode("5}.")])
    mask = (seq != tiny_tokenizer().pad_token_id).long()
    features = layer_logit_features(model, seq, mask, torch.tensor([-1, len(encode("q?")) + len(ANCHOR) - 1]))
    assert torch.isnan(features[0]).all() and torch.isfinite(features[1]).all()


def test_hooks_are_removed_even_when_the_forward_raises():
    model = tiny_model(tiny_tokenizer(), "qwen2")
    seq = torch.tensor([encode("q?") + ANCHOR + encode("5}")])

    def fail(module, args):
        raise RuntimeError("out of memory")

    model.model.norm.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        layer_logit_features(model, seq, torch.ones_like(seq), torch.tensor([len(encode("q?")) + len(ANCHOR) - 1]))
    assert all(len(block._forward_hooks) == 0 for block in model.model.layers)


def test_negative_response_start_is_rejected():
    with pytest.raises(ValueError, match=r"response_start must be >= 0, got \[-2\]"):
        find_answer_positions(torch.tensor([encode("q? \\boxed{1}")]), torch.tensor([-2]), tiny_tokenizer())


def test_rows_without_tokens_have_no_position():
    positions = find_answer_positions(torch.zeros((2, 0), dtype=torch.long), torch.tensor([0, 0]), tiny_tokenizer())
    assert positions.tolist() == [-1, -1]


@pytest.mark.parametrize("position", [5, 9, -2], ids=["last-token", "past-the-row", "below-minus-one"])
def test_positions_without_an_answer_token_after_them_are_rejected(position):
    model, seq = tiny_model(tiny_tokenizer()), torch.tensor([encode("q? so \\boxed{1}")[:6]])
    with pytest.raises(ValueError, match=rf"positions\[0\] = {position} is not a token"):
        layer_logit_features(model, seq, torch.ones_like(seq), torch.tensor([position]), num_layers=2)


def test_num_layers_below_one_is_rejected():
    model, seq = tiny_model(tiny_tokenizer()), torch.tensor([encode("q? so \\boxed{1}")])
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        layer_logit_features(model, seq, torch.ones_like(seq), torch.tensor([2]), num_layers=0)
