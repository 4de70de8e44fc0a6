"""The embedded default: a tiny Llama built from a config, a character tokenizer made locally, and an
offline task a randomly initialized model can learn with GRPO in minutes on a CPU.

Task "reverse": the prompt is a word over LETTERS followed by "=", the answer is the word reversed
("cab=" -> "bac"). The reward gives dense partial credit: matched positions / max(len(answer),
len(completion)), in [0, 1]. A random policy scores about 1/len(vocab); copying the last letter alone
is worth 1/WORD_LEN, so the reward rises from the first steps. HELDOUT of the len(LETTERS)**WORD_LEN words
(seeded) form the held-out split "test" and never appear in training prompts.
"""

from __future__ import annotations

import itertools
import random

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LETTERS = "abcdefgh"
WORD_LEN = 3
SPECIALS = ("<pad>", "<eos>", "=")
HELDOUT = 64  # of the 512 words: the held-out split


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: <pad>, <eos>, '=', then LETTERS."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *LETTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (hidden 64, about 0.1M parameters) with random weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def reverse_task(n: int = 2000, seed: int = 1234, split: str = "train") -> list[dict]:
    """Rows {"prompt": "cab=", "answer": "bac"}: split "train", n rows of words drawn at random from all but the
    HELDOUT held-out words; split "test", each held-out word once."""
    if split not in ("train", "test"):
        raise ValueError(f"dataset_split for the built-in task 'reverse' must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    words = ["".join(w) for w in itertools.product(LETTERS, repeat=WORD_LEN)]
    rng.shuffle(words)
    chosen = words[:HELDOUT] if split == "test" else [rng.choice(words[HELDOUT:]) for _ in range(n)]
    return [{"prompt": word + "=", "answer": word[::-1]} for word in chosen]


def reverse_reward(prompts, completions, completion_ids=None, *, answer, **kwargs) -> list[float]:
    """Matched positions / max(len(answer), len(completion)): dense credit in [0, 1]."""
    out = []
    for completion, want in zip(completions, answer):
        hits = sum(a == b for a, b in zip(completion, want))
        out.append(hits / max(len(want), len(completion), 1))
    return out
