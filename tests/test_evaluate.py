"""Held-out evaluation: greedy completions equal the model's own greedy `generate`, are deterministic, and are
scored into pass rate and mean reward; a policy that always answers correctly scores 1, a wrong one 0."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_fast import evaluate, rewards, tasks, tiny


def reverse_rows(n: int) -> list[dict]:
    return tiny.reverse_task(n=n, seed=5)


def test_greedy_matches_the_models_own_generate_and_is_deterministic():
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, seed=3).eval()
    rows = reverse_rows(5)
    prompts = [r["prompt"] for r in rows]
    texts, ids = evaluate.greedy_completions(model, tok, prompts, max_prompt_length=8, max_new_tokens=6, batch=2)
    for prompt, got in zip(prompts, ids):
        x = torch.tensor([tok(prompt).input_ids])
        out = model.generate(
            x, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )[0, x.shape[1] :].tolist()
        want = out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out  # up to and with EOS
        assert got == want
    funcs = {"reverse": rewards.resolve("reverse", 6)}
    first = evaluate.evaluate(model, tok, rows, funcs, max_prompt_length=8, max_new_tokens=6)
    again = evaluate.evaluate(model, tok, rows, funcs, max_prompt_length=8, max_new_tokens=6, batch=3)
    assert first == again and first["prompts"] == 5
    assert texts == evaluate.greedy_completions(model, tok, prompts, max_prompt_length=8, max_new_tokens=6)[0]


def always_says(token: str, tok) -> LlamaForCausalLM:
    """A stub policy whose LM head (zero weight, bias) makes `token` the greedy choice at every position."""
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tok.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head
    return model


def digit_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *"0123456789+-*/=? "])}  # letters: unknown (<pad>)
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


def test_always_right_scores_one_and_always_wrong_zero():
    tok = digit_tokenizer()
    rows = [r for r in tasks.arithmetic("test", size=10, heldout=50, digits=1) if r["answer"] == "7"]  # 3 + 4, ...
    funcs = {"arithmetic": rewards.resolve("arithmetic", 1)}
    right = evaluate.evaluate(always_says("7", tok), tok, rows, funcs, max_new_tokens=1, max_prompt_length=64)
    wrong = evaluate.evaluate(always_says("8", tok), tok, rows, funcs, max_new_tokens=1, max_prompt_length=64)
    assert len(rows) >= 3
    assert right == {"pass_rate": 1.0, "reward": 1.0, "reward_arithmetic_mean": 1.0, "prompts": len(rows)}
    assert wrong == {"pass_rate": 0.0, "reward": 0.0, "reward_arithmetic_mean": 0.0, "prompts": len(rows)}
    mixed = rows[:2] + [{"prompt": "What is 4 + 4?", "answer": "8"}]  # the stub says 7: 2 of 3 pass
    got = evaluate.evaluate(always_says("7", tok), tok, mixed, funcs, max_new_tokens=1, max_prompt_length=64)
    assert got["pass_rate"] == pytest.approx(2 / 3) and got["reward"] == pytest.approx(2 / 3)


def fixed(values, top="absent"):
    def reward(prompts, completions, completion_ids, **kw):
        return list(values)

    if top != "absent":
        reward.max_reward = top
    return reward


def test_pass_needs_every_declared_maximum():
    n = 4
    funcs = {
        "task": fixed([1.0, 1.0, 0.5, None], top=1.0),  # last sample unscored by the task
        "style": fixed([2.0, 0.0, 2.0, 2.0], top=2.0),
        "shaping": fixed([0.3, 0.9, 0.1, 0.2]),  # declares no maximum: takes no part in passing
    }
    got = evaluate.score(funcs, [1.0, 0.5, 1.0], [""] * n, [""] * n, [[]] * n, {})
    assert got["pass_rate"] == pytest.approx(1 / 3)  # sample 0 passes; 1 and 2 do not; 3 is unscored
    assert got["reward"] == pytest.approx((2.3 + 1.9 + 1.6 + 1.2) / 4)  # weighted total, None counts 0
    assert got["reward_task_mean"] == pytest.approx(2.5 / 3) and got["reward_shaping_mean"] == pytest.approx(0.375)


def test_no_declared_maximum_gives_no_pass_rate_and_above_maximum_is_an_error():
    got = evaluate.score({"user": fixed([0.2, 0.4])}, [1.0], ["", ""], ["", ""], [[], []], {})
    assert got["pass_rate"] is None and got["reward"] == pytest.approx(0.3)
    with pytest.raises(rewards.RewardError, match="'loose' returned 1.5, above the max_reward 1.0"):
        evaluate.score({"loose": fixed([1.5, 0.0], top=1.0)}, [1.0], ["", ""], ["", ""], [[], []], {})
    with pytest.raises(ValueError, match="max_reward must be a finite number"):
        evaluate.score({"bad": fixed([0.0, 0.0], top=math.inf)}, [1.0], ["", ""], ["", ""], [[], []], {})
    with pytest.raises(ValueError, match="rows is empty"):
        evaluate.evaluate(None, None, [], {})
