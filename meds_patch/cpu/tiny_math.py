"""A tiny Qwen2 that writes ``\\boxed{}`` answers to two-number sums, and a prompt set whose questions repeat.

MEDS needs wrong answers with an answer position, and questions it has seen before. A random model never
writes ``\\boxed{``, so the model is fine-tuned here, briefly, on worked sums: it learns the format well and
the arithmetic only partly, so its wrong answers recur the way a collapsing policy's do. Everything is built
from code (no hub access) and cached by content, so the demo and the tests prepare it once per machine.
"""

import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from typing import List

import torch

PROMPT = (
    "Question: what is {a} + {b}? Please reason step by step, and put your final answer within \\boxed{{}}. Answer:"
)
SOLUTION = " {a} + {b} = {c}, so the answer is \\boxed{{{c}}}."
# The GPU recipes' prompt (PROMPT_TEMPLATE in examples/scripts/meds_recipe_common.sh, a str.format template; the tests
# check that the two agree) and the bare question that their datasets hold: the recipe model learns to answer under it.
QWEN_MATH_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QUESTION = "what is {a} + {b}?"
PAIRS = [(a, b) for a in range(12) for b in range(12)]
CORPUS = [PROMPT.format(a=a, b=b) + SOLUTION.format(a=a, b=b, c=a + b) for a, b in PAIRS]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A byte-level BPE trained on the corpus, with pad and end-of-text tokens (left padding for generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


def tiny_model(tokenizer, arch: str = "qwen2", num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random model from a config. Head dimension 32: vLLM's CPU attention has no kernel for 16."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **config)).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **config)).eval()
    raise ValueError(f"unknown arch {arch!r}: use qwen2 or llama")


def fine_tune(model, tokenizer, steps: int, lr: float = 3e-3, batch_size: int = 16, seed: int = 0, corpus=CORPUS):
    """Plain next-token training on ``corpus`` (each text ends with end-of-text); returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    texts = [text + tokenizer.eos_token for text in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        picked = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in picked], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def cache_root() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "openrlhf-meds")


def tuned_model(name: str, corpus: List[str], steps: int, batch_size: int = 16, num_layers: int = 4) -> str:
    """The folder of the tiny Qwen2 fine-tuned ``steps`` steps on ``corpus`` (model, tokenizer, generation config),
    built once and cached as ``name``-HASH. The hash covers the corpus, the settings and this module's source (the
    tokenizer, the model and the training), so a change to any of them builds a new model."""
    recipe = repr((inspect.getsource(sys.modules[__name__]), corpus, steps, batch_size, num_layers))
    target = os.path.join(cache_root(), f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}")
    if os.path.isdir(target):
        return target
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    model = tiny_model(tokenizer, num_layers=num_layers)
    fine_tune(model, tokenizer, steps, batch_size=batch_size, corpus=corpus)
    tokenizer.padding_side = "left"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(cache_root(), exist_ok=True)
    # Built aside and renamed into place: a concurrent or killed build leaves no half model behind.
    staging = tempfile.mkdtemp(dir=cache_root())
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prepared_model() -> str:
    """The demo's model: the tiny Qwen2 after 150 steps on the one-digit sums of ``CORPUS``."""
    return tuned_model("tiny-math-qwen2", CORPUS, steps=150)


def recipe_model() -> str:
    """The model of ``demo --recipe``: 14 blocks, so that the recipes' ``--algo.meds.num_layers 14`` reads 14 real
    layers, fine-tuned on the sums under the recipes' Qwen-Math template."""
    corpus = [
        QWEN_MATH_TEMPLATE.format(QUESTION.format(a=a, b=b)) + SOLUTION.format(a=a, b=b, c=a + b) for a, b in PAIRS
    ]
    return tuned_model("tiny-math-qwen2-14", corpus, steps=1200, num_layers=14)


def write_prompts(path: str, pairs) -> str:
    """A JSONL prompt set (``prompt``, ``label``) for ``--data.input_key prompt --data.label_key label``."""
    with open(path, "w", encoding="utf-8") as fh:
        for a, b in pairs:
            fh.write(json.dumps({"prompt": PROMPT.format(a=a, b=b), "label": str(a + b)}) + "\n")
    return path
