"""The model-coverage matrix (issue 9): a tiny random config of every decoder-only family people fine-tune, each
exact in a half of the engine or refused there with a clear message; ARCHS says which, and the README table of
supported architectures is generated from it (test_readme_table).

Exact means, against the model's own forward (its default attention implementation, or eager where SDPA cannot
express the model's attention):
- training: sequence_logps, shared and unshared prefix, equals log_softmax of the model's per-row logits in
  values and parameter gradients, and fused_linear_grpo_loss on completion_hidden_states equals grpo_loss on the
  model's own logits (value and gradients; old/ref log-probs = own + noise, so ratios clip on both sides);
- rollouts: greedy generate_groups equals model.generate (explicit attention mask; one prompt holds the pad id),
  and model.generate after the engine has run (the model is left on the engine's attention) is unchanged.
Sliding windows (W = 4) are shorter than every prompt and most completions; MoE models are deterministic (no
router jitter, no dropout anywhere); weights are drawn 10x the default scale and GPT-OSS sinks near the scores,
so that windows, sinks and soft-capping change the outputs: test_matrix_exercises_windows_sinks_and_caps shows
that an engine ignoring any of them would be refused.
The fused ops run their chunked torch path (the kernels are tested against it elsewhere): this file is about models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from grpo_fast import attention, cascade, fused_linear_grpo_loss, generate_groups, grpo_loss, sequence_logps
from grpo_fast.attention import UnsupportedModelError
from grpo_fast.guard import verdicts
from grpo_fast.logit_head import logit_transform
from grpo_fast.packing import completion_hidden_states, lm_head

V, EOS, PAD, G, W = 101, 2, 0, 3, 4
IDS = dict(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
LAYERS = dict(num_hidden_layers=2, max_position_embeddings=64, **IDS)
NO_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # GPT-2's defaults are 0.1
HEADS = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
COMMON = dict(vocab_size=V, **HEADS, **LAYERS)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
BOTH = ["sliding_attention", "full_attention"]
MLA = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6)  # DeepSeek-V3
MLA |= dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
MLA |= dict(n_group=1, topk_group=1)

EXACT = "exact"
MISMATCH = "log-probs differ from the model's own forward"  # the guard's numeric refusal
OWN_CODE = "computes attention in its own code"


@dataclass(frozen=True)
class Arch:
    config: object  # () -> PretrainedConfig
    training: str = EXACT  # EXACT, or a regex the refusal message matches
    rollouts: str = EXACT
    why: str = ""  # the README's note
    attn: str | None = None  # attn_implementation to load with (None: transformers' default)


ARCHS = {
    "llama": Arch(lambda: tf.LlamaConfig(**COMMON)),
    "qwen2": Arch(
        lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=W, max_window_layers=1),
        why="`use_sliding_window`/`max_window_layers` (the second of 2 layers sliding)",
    ),
    "qwen3": Arch(lambda: tf.Qwen3Config(**COMMON, head_dim=8)),
    "qwen2_moe": Arch(lambda: tf.Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=16), why="MoE"),
    "qwen3_moe": Arch(lambda: tf.Qwen3MoeConfig(**COMMON, **MOE, head_dim=8), why="MoE"),
    "gemma": Arch(lambda: tf.GemmaConfig(**COMMON, head_dim=8)),
    "gemma2": Arch(
        lambda: tf.Gemma2Config(
            **COMMON, head_dim=8, sliding_window=W, attn_logit_softcapping=0.5, final_logit_softcapping=0.1
        ),
        why="`final_logit_softcapping` (as released), sliding layers, attention soft-capping",
        attn="eager",
    ),
    "gemma2_no_final_cap": Arch(
        lambda: tf.Gemma2Config(
            **COMMON, head_dim=8, sliding_window=W, attn_logit_softcapping=0.5, final_logit_softcapping=None
        ),
        why="without the final cap: sliding layers, attention soft-capping (the model's eager attention)",
        attn="eager",  # SDPA cannot soft-cap: transformers 5.17 drops the cap under SDPA, 5.24 refuses SDPA
    ),
    "gemma3_text": Arch(
        lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=W, layer_types=BOTH),
        why="sliding and full layers (`layer_types`)",
    ),
    "mistral": Arch(lambda: tf.MistralConfig(**COMMON, sliding_window=W), why="config-wide `sliding_window`"),
    "mixtral": Arch(
        lambda: tf.MixtralConfig(**COMMON, sliding_window=W, num_local_experts=4, num_experts_per_tok=2),
        why="config-wide `sliding_window`, MoE",
    ),
    "gpt_oss": Arch(
        lambda: tf.GptOssConfig(
            **COMMON, head_dim=8, sliding_window=W, layer_types=BOTH, num_local_experts=4, num_experts_per_tok=2
        ),
        why="sliding and full layers, attention sinks (the model's eager attention)",
    ),
    "granite": Arch(
        lambda: tf.GraniteConfig(**COMMON, logits_scaling=4.0),
        why="`logits_scaling` (logits divided by it)",
    ),
    "cohere": Arch(
        lambda: tf.CohereConfig(**COMMON, logit_scale=0.25),
        why="`logit_scale` (logits multiplied by it)",
    ),
    "phi": Arch(lambda: tf.PhiConfig(**COMMON), why="partial rotary, biased LM head"),
    "phi3": Arch(lambda: tf.Phi3Config(**COMMON, sliding_window=W), why="config-wide `sliding_window`"),
    "falcon": Arch(
        lambda: tf.FalconConfig(
            vocab_size=V, hidden_size=32, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, **LAYERS
        ),
        rollouts=OWN_CODE,
        why="attends in its own code, not through transformers' AttentionInterface: packed forward with one "
        "mask; no cascade",
    ),
    "stablelm": Arch(lambda: tf.StableLmConfig(**COMMON), why="its layers drop forward kwargs: one packed mask"),
    "starcoder2": Arch(lambda: tf.Starcoder2Config(**COMMON, sliding_window=W), why="config-wide `sliding_window`"),
    "olmo2": Arch(lambda: tf.Olmo2Config(**COMMON)),
    "smollm3": Arch(lambda: tf.SmolLM3Config(**COMMON)),
    "gpt_neox": Arch(lambda: tf.GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"})),
    "ministral": Arch(
        lambda: tf.MinistralConfig(**COMMON, head_dim=8, sliding_window=W, layer_types=BOTH),
        why="sliding and full layers (`layer_types`)",
    ),
    "olmo3": Arch(lambda: tf.Olmo3Config(**COMMON, sliding_window=W, layer_types=BOTH), why="sliding and full layers"),
    "exaone4": Arch(
        lambda: tf.Exaone4Config(**COMMON, sliding_window=W, layer_types=BOTH), why="sliding and full layers"
    ),
    "cohere2": Arch(
        lambda: tf.Cohere2Config(**COMMON, sliding_window=W, layer_types=BOTH, logit_scale=0.25),
        why="`logit_scale` (logits multiplied by it)",
    ),
    "glm4": Arch(lambda: tf.Glm4Config(**COMMON, head_dim=8)),
    "deepseek_v3": Arch(
        lambda: tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **MLA),
        why="multi-head latent attention (value heads smaller than key heads), MoE",
    ),
    "llama4_text": Arch(
        lambda: tf.Llama4TextConfig(**COMMON, head_dim=8, attention_chunk_size=W),
        training=MISMATCH,
        rollouts=MISMATCH,
        why="chunked local attention (`attention_chunk_size`) is not implemented: the guard refuses it",
    ),
    "gpt2": Arch(
        lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, **NO_DROPOUT, **IDS),
        why="learned absolute positions",
    ),
}


def load(arch: str, tmp_path) -> torch.nn.Module:
    """The tiny model saved and loaded back through from_pretrained (default attention unless ARCHS says), in
    train mode with gradient checkpointing (the backward recomputes each layer under the engine's masks)."""
    torch.manual_seed(0)
    config = ARCHS[arch].config()
    config.initializer_range = 0.2  # 10x the default: peaked attention and logits, where windows and caps matter
    model = AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("sinks"):  # GPT-OSS: sinks comparable to the attention scores, so that they matter
            torch.nn.init.normal_(p, mean=1.0, std=1.0)
    model.save_pretrained(tmp_path / arch)
    kwargs = {"attn_implementation": ARCHS[arch].attn} if ARCHS[arch].attn else {}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32, **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the trainer
    return model.train()


def batch():
    """2 prompts (7 and 9 tokens, one holding the pad id) x G=3 completions: EOS-terminated of different lengths,
    one cut at Tc = 8, one of a single token, one empty."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=gen) for n in (7, 9)]
    prompts[1][3] = PAD
    lengths = torch.tensor([5, 8, 1, 6, 0, 7])
    ids = torch.randint(3, V, (2 * G, 8), generator=gen)
    ids[torch.arange(2 * G), (lengths - 1).clamp(min=0)] = EOS
    ids[1, 7] = 17  # row 1 runs to Tc without EOS
    return prompts, ids, (torch.arange(8)[None] < lengths[:, None]).long()


def own_logits(model, prompts, ids, mask) -> torch.Tensor:
    """(B*G, Tc, V) from the model's own forward, one row [P | Ci] at a time; 0 past each completion."""
    out = torch.zeros(*ids.shape, V, device=ids.device)
    for r in range(ids.shape[0]):
        p, n = prompts[r // G], int(mask[r].sum())
        out[r, :n] = model(torch.cat([p, ids[r, :n]])[None]).logits[0, p.numel() - 1 : -1].float()
    return out


def grads(model, objective: torch.Tensor) -> dict:
    params = dict(model.named_parameters())
    got = torch.autograd.grad(objective, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(params, got) if g is not None}


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], atol=3e-5, rtol=1e-4, msg=f"{what}: {name}")


def loss_kwargs(logps: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(4)
    noise = lambda: 0.3 * torch.randn(logps.shape, generator=gen).to(logps.device)  # noqa: E731
    rewards = torch.rand(logps.shape[0], generator=gen).to(logps.device)
    return dict(rewards=rewards, group_size=G, old_logps=logps + noise(), ref_logps=logps + noise(), beta=0.04)


def greedy_generate(model, prompts) -> list[torch.Tensor]:
    model.eval()
    out = []
    for p in prompts:
        x = model.generate(p[None], attention_mask=torch.ones_like(p)[None], max_new_tokens=6, do_sample=False,
                           eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
        out.append(x[0, p.numel() :])
    model.train()
    return out


def check_training(model, prompts, ids, mask, ref_logits) -> None:
    ref = torch.log_softmax(ref_logits, -1).gather(-1, ids[..., None]).squeeze(-1) * mask  # (B*G, Tc)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(ref.device)
    kw = loss_kwargs(ref.detach())
    ref_loss, _ = grpo_loss(ref_logits, ids, mask, **kw)
    want_logps, want_loss = grads(model, (ref * weights).sum()), grads(model, ref_loss)
    for shared in (True, False):
        got = sequence_logps(model, prompts, ids, mask, group_size=G, shared_prefix=shared)
        torch.testing.assert_close(got, ref.detach(), atol=2e-5, rtol=1e-5)
        assert_grads_close(grads(model, (got * weights).sum()), want_logps, f"sequence_logps shared={shared}")
    weight, bias = lm_head(model)
    hidden = completion_hidden_states(model, prompts, ids, mask, group_size=G)  # (B*G, Tc, H)
    head = logit_transform(model).kwargs()  # the model's logit scale / softcap, as the trainer passes them
    loss, _ = fused_linear_grpo_loss(hidden, weight, ids, mask, bias=bias, **kw, **head)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=2e-5, rtol=1e-5)
    assert_grads_close(grads(model, loss), want_loss, "fused_linear_grpo_loss")


def check_rollouts(model, prompts, before: list[torch.Tensor]) -> None:
    ro = generate_groups(model, prompts, G, max_new_tokens=6, temperature=0, eos_token_id=EOS, pad_token_id=PAD)
    for b, ref in enumerate(before):
        assert ro.completion_lengths[b * G : (b + 1) * G].eq(ref.numel()).all()  # generate stops at EOS too
        assert ro.completion_ids[b * G : (b + 1) * G, : ref.numel()].eq(ref).all(), (ro.completion_ids, ref)
    for a, b in zip(greedy_generate(model, prompts), before):  # the model is left on the engine's attention
        assert torch.equal(a, b)


def check_refused(pattern: str, call) -> None:
    with pytest.raises(UnsupportedModelError, match=pattern):
        call()


@pytest.mark.usefixtures("trainer_cpu_path")
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture(arch, tmp_path):
    spec, model = ARCHS[arch], load(arch, tmp_path)
    prompts, ids, mask = batch()
    ref_logits = own_logits(model, prompts, ids, mask)  # before the engine points the model at its attention
    before = greedy_generate(model, prompts)
    found = verdicts(model)
    for half in ("training", "rollouts"):
        expect = getattr(spec, half)
        assert (found[half] is None) == (expect == EXACT), (half, found[half])
        assert found[half] is None or re.search(expect, found[half]), found[half]
    if spec.training == EXACT:
        check_training(model, prompts, ids, mask, ref_logits)
    else:
        check_refused(spec.training, lambda: sequence_logps(model, prompts, ids, mask, group_size=G))
    if spec.rollouts == EXACT:
        check_rollouts(model, prompts, before)
    else:
        check_refused(spec.rollouts, lambda: generate_groups(model, prompts, G, max_new_tokens=2))


@pytest.mark.parametrize(
    ("arch", "kwarg"),
    [("mistral", "sliding_window"), ("gemma3_text", "sliding_window"), ("gpt_oss", "sliding_window"),
     ("gpt_oss", "s_aux"), ("gemma2_no_final_cap", "softcap"), ("qwen2", "sliding_window")],
)  # fmt: skip
def test_matrix_exercises_windows_sinks_and_caps(arch, kwarg, tmp_path, monkeypatch):
    """An engine that ignored a layer's window, sinks or soft-capping would be refused on these configs (by far
    more than the tolerance): the matrix tests those features, not configs where they make no difference."""
    real = attention.attention_options

    def ignoring(module, kwargs, where):  # the layer's kwarg never reaches the engine's attention
        kwargs.pop(kwarg, None)
        return real(module, kwargs, where)

    monkeypatch.setattr(attention, "attention_options", ignoring)
    monkeypatch.setattr(cascade, "attention_options", ignoring)
    for message in verdicts(load(arch, tmp_path)).values():
        assert float(re.search(r"own forward by ([^ ]+) ", message).group(1)) > 0.01, message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention (forward and backward) needs CUDA")
@pytest.mark.parametrize("arch", ["mistral", "gemma3_text", "gpt_oss", "gemma2_no_final_cap", "qwen2"])
def test_flex_attention_on_cuda(arch, tmp_path):
    """On CUDA, attention="auto" is FlexAttention with a block mask per window (sinks renormalized by its
    log-sum-exp, soft-capping in its score_mod): the training checks of test_architecture hold there too."""
    model = load(arch, tmp_path).cuda()
    prompts, ids, mask = batch()
    prompts, ids, mask = [p.cuda() for p in prompts], ids.cuda(), mask.cuda()
    check_training(model, prompts, ids, mask, own_logits(model, prompts, ids, mask))


def table() -> str:
    """The README's table of supported architectures, from ARCHS."""
    verdict = lambda s: "exact" if s == EXACT else "refused"  # noqa: E731
    rows = ["| model class (`model_type`) | training forward | rollouts | what the matrix exercises / why refused |",
            "| --- | --- | --- | --- |"]  # fmt: skip
    for name in sorted(ARCHS):
        spec = ARCHS[name]
        model_type = spec.config().model_type
        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        rows.append(f"| {cls} (`{model_type}`) | {verdict(spec.training)} | {verdict(spec.rollouts)} | {spec.why} |")
    return "\n".join(rows)


def test_readme_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table() in readme, "README's architecture table is stale: paste tests/test_model_coverage.py table()"
