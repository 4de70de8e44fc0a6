"""The guard (grpo_fast/guard.py): a model whose own forward the engine does not reproduce is refused, with the
architecture and the size of the mismatch, in sequence_logps, generate_groups and the trainer (exit code 2 before
step 1); the check runs once per model, in eval mode, leaving the RNG and the training mode as they were."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from grpo_fast import generate_groups, guard, sequence_logps, train
from grpo_fast.attention import UnsupportedModelError

V, G = 61, 2
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0)  # fmt: skip


def tiny(config, tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)


def scale_logits(model, factor: float) -> None:
    """A model whose logits are not hidden @ W^T, as the engine would assume: its forward scales them."""
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = scaled


def inputs():
    prompts = [torch.randint(3, V, (6,), generator=torch.Generator().manual_seed(0))]
    ids = torch.randint(3, V, (G, 4), generator=torch.Generator().manual_seed(1))
    return prompts, ids, torch.ones(G, 4, dtype=torch.long)


@pytest.fixture
def counted(monkeypatch):
    """Counts the guard's comparisons (verdicts calls)."""
    calls = []
    real = guard.verdicts
    monkeypatch.setattr(guard, "verdicts", lambda model: calls.append(model) or real(model))
    return calls


def test_refuses_scaled_logits_everywhere_once(tmp_path, counted):
    model = tiny(LlamaConfig(**SMALL), tmp_path)
    scale_logits(model, 1.5)
    prompts, ids, mask = inputs()
    for _ in range(2):  # the second call reuses the verdict
        with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM .* differ from the model's own forward by"):
            sequence_logps(model, prompts, ids, mask, group_size=G)
        with pytest.raises(UnsupportedModelError, match=r"rollout engine .* tolerance 0.001 in torch.float32"):
            generate_groups(model, prompts, G, max_new_tokens=3)
    assert len(counted) == 1
    assert isinstance(UnsupportedModelError("x"), ValueError)  # the trainer's one-line exit 2 path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_model_passes_once_and_leaves_no_trace(tmp_path, counted, dtype):
    """Gemma 3 (a sliding layer, window 5 < the check sample) passes in fp32 and in bf16 (rounding below the
    tolerance); the check restores the training mode and leaves the global RNG untouched."""
    layers = ["sliding_attention", "full_attention"]
    config = Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=5, layer_types=layers)
    model = tiny(config, tmp_path, dtype).train()
    rng = torch.get_rng_state()
    guard.check_model(model)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    prompts, ids, mask = inputs()
    sequence_logps(model, prompts, ids, mask, group_size=G)
    generate_groups(model, prompts, G, max_new_tokens=3, temperature=0)
    assert len(counted) == 1


def test_trainer_refuses_before_step_one(tmp_path, monkeypatch, capsys, trainer_cpu_path):
    real = LlamaForCausalLM.forward

    def scaled(self, *args, **kwargs):  # every Llama the trainer builds scales its logits by 1.5
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled)
    out = tmp_path / "run"
    assert train.main(["--max-steps", "2", "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: LlamaForCausalLM"), err
    assert "differ from the model's own forward by" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_non_finite_model_gets_no_verdict_until_it_is_finite(tmp_path, counted):
    """NaN weights make the model's own forward NaN: nothing to compare, so the guard neither refuses nor caches;
    the engine's output is NaN like the model's (test_paths_agree), and a later use with finite weights is checked."""
    model = tiny(LlamaConfig(**SMALL), tmp_path).eval()
    prompts, ids, mask = inputs()
    weight = model.lm_head.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[5, 0] = float("nan")
        assert torch.isnan(sequence_logps(model, prompts, ids, mask, group_size=G)).all()
        weight.copy_(saved)
        scale_logits(model, 1.5)  # now finite, and not reproduced: refused at the next use
    with pytest.raises(UnsupportedModelError, match="differ from the model's own forward"):
        sequence_logps(model, prompts, ids, mask, group_size=G)
    assert len(counted) == 2
