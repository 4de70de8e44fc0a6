"""The trainer end to end on sliding-window models (issue 9): a tiny Gemma 3 (a sliding and a full layer) and a
tiny Mistral (a config-wide window), each window (3) shorter than every prompt + completion, loaded by path with
LoRA; the guard checks the model before step 1."""

import json

import pytest
import torch
from test_train_run import METRIC_KEYS, char_tokenizer
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig

from grpo_fast import guard, policy, train
from grpo_fast.config import Config

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")

SLIDING = {
    "gemma3": lambda v: Gemma3TextConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, bos_token_id=1,
        sliding_window=3, layer_types=["sliding_attention", "full_attention"],
    ),
    "mistral": lambda v: MistralConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, sliding_window=3,
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_trains_sliding_window_model(arch, tmp_path, monkeypatch):
    model_dir, data = tmp_path / arch, tmp_path / "train.jsonl"
    tok = char_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(SLIDING[arch](len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": f"{a}+{b}=?", "answer": str(a + b)} for a in range(4) for b in range(3)]
    assert min(len(policy.encode_prompt(tok, r["prompt"], None, 8)) for r in rows) > 3  # prompts span the window
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = []
    real_verdicts, real_sample = guard.verdicts, train.sample
    monkeypatch.setattr(guard, "verdicts", lambda model: events.append("guard") or real_verdicts(model))
    monkeypatch.setattr(train, "sample", lambda *a, **kw: events.append("rollout") or real_sample(*a, **kw))
    cfg = Config(
        model=str(model_dir), dataset=str(data), rewards=["math", "length"], group_size=4, prompts_per_step=2,
        micro_batch_groups=1, max_prompt_length=8, max_new_tokens=6, max_steps=2, save_steps=0, beta=0.04,
        lora_rank=4, learning_rate=1e-3, output_dir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    rows = train.run(cfg)
    assert events == ["guard", "rollout", "rollout"]  # checked once, before step 1
    assert [r["step"] for r in rows] == [1, 2] and all(METRIC_KEYS <= set(r) for r in rows)
    assert all(r["skipped"] == 0 and r["kl"] >= 0 for r in rows)
    # a step whose groups all scored equal rewards has no gradient (zero advantages; KL is 0 before any update)
    assert any(r["grad_norm"] > 0 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows if r["frac_reward_zero_std"] < 1)
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
