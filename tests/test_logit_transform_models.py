"""Models whose logits are not hidden @ W^T: Granite (logits_scaling), Cohere (logit_scale), Gemma 2
(final_logit_softcapping, and attention softcapping in rollouts). The engine's log-probs and gradients
(sequence_logps), the trainer's loss, and greedy and sampled rollouts (generate_groups) against each model's OWN
forward. Tiny random configs, saved and loaded back; no sliding-window layers (every layer full attention), so
only the logit transform is under test."""

import dataclasses

import pytest
import torch
from test_packing import G, batch, value_and_grads
from test_train_loss import fixed_rollout, grads, per_row_logits
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

from grpo_fast import config, decode, generate_groups, reference, tiny, train
from grpo_fast.config import PRESETS, Config
from grpo_fast.packing import completion_hidden_states, lm_head, sequence_logps

V, EOS, PAD = 101, 2, 0
SMALL = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=48, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1,
)  # fmt: skip
CONFIGS = {  # transforms large enough to matter for a tiny random model (its raw logits are ~0.1 to ~1)
    "granite": lambda **kw: GraniteConfig(**kw, logits_scaling=0.125),  # logits * 8
    "cohere": lambda **kw: CohereConfig(**kw, logit_scale=8.0),
    "gemma2": lambda attn_softcap=None, **kw: Gemma2Config(
        **kw,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=attn_softcap,
        initializer_range=0.2,
        query_pre_attn_scalar=8,
        layer_types=["full_attention"] * 2,
        sliding_window=64,
    ),  # fmt: skip
}


def tiny_model(arch: str, tmp_path, vocab: int = V, **fields):
    """Loaded with eager attention (Gemma 2 refuses SDPA): the reference forwards and `generate` run eager; the
    packed training forward switches to SDPA itself, the rollouts to cascade attention."""
    torch.manual_seed(0)
    config = CONFIGS[arch](**{**SMALL, "vocab_size": vocab}, **fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    return AutoModelForCausalLM.from_pretrained(tmp_path / arch, attn_implementation="eager", dtype=torch.float32)


def own_logps(model, prompts, ids, mask, temperature: float):
    """One forward per row [P | Ci]: log_softmax(model(...).logits / T) of the completion tokens."""
    out = torch.zeros(ids.shape)
    for r in range(ids.shape[0]):
        p, n = prompts[r // G], int(mask[r].sum())
        logits = model(torch.cat([p, ids[r, :n]])[None]).logits[0, p.numel() - 1 : -1].float()  # (n, V)
        out[r, :n] = torch.log_softmax(logits / temperature, -1).gather(-1, ids[r, :n, None]).squeeze(-1)
    return out


@pytest.mark.parametrize("arch", CONFIGS)
def test_sequence_logps_equals_own_forward(arch, tmp_path):
    model = tiny_model(arch, tmp_path)
    model.gradient_checkpointing_enable()
    model.train()
    prompts, ids, mask = batch()
    ref, ref_grads = value_and_grads(model, lambda: own_logps(model, prompts, ids, mask, 0.7))
    for shared in (True, False):
        got, got_grads = value_and_grads(
            model,
            lambda shared=shared: sequence_logps(
                model, prompts, ids, mask, group_size=G, temperature=0.7, shared_prefix=shared
            ),
        )
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert got_grads.keys() == ref_grads.keys() and len(got_grads) == len(list(model.parameters()))
        for name, g in got_grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=f"{arch} {shared} {name}")
    with torch.no_grad():  # the transform matters: the plain head hidden @ W^T is off by far more than the tolerance
        weight, _ = lm_head(model)
        plain = torch.log_softmax(
            completion_hidden_states(model, prompts, ids, mask, group_size=G) @ weight.T / 0.7, -1
        )
        plain = plain.gather(-1, ids[..., None]).squeeze(-1) * mask
    assert (plain - ref).abs().max() > 0.05


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, V, (n,), generator=gen) for n in (6, 3, 9)]


def _rollout_model(arch, tmp_path):
    """Gemma 2 with attention softcapping as well: the cascade attention must apply it like eager attention."""
    fields = {"attn_softcap": 1.0} if arch == "gemma2" else {}
    return tiny_model(arch, tmp_path, **fields).eval()


@pytest.mark.parametrize("arch", CONFIGS)
def test_greedy_rollout_equals_generate(arch, tmp_path):
    model = _rollout_model(arch, tmp_path)
    ps = _prompts()
    ro = generate_groups(model, ps, 2, max_new_tokens=6, temperature=0, eos_token_id=EOS, pad_token_id=PAD)
    for b, p in enumerate(ps):
        ref = model.generate(
            p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=6, do_sample=False,
            eos_token_id=EOS, pad_token_id=PAD,
        )[0, p.numel() :]  # fmt: skip
        assert ro.completion_lengths[2 * b : 2 * b + 2].eq(ref.numel()).all()
        assert ro.completion_ids[2 * b : 2 * b + 2, : ref.numel()].eq(ref).all()


@pytest.mark.parametrize("arch", CONFIGS)
def test_sampling_distribution_is_the_models(arch, tmp_path, monkeypatch):
    """Every step of a seeded sampled rollout draws from softmax(logits / T) of logits equal to the model's own
    next-token logits (full forward of prompt + the row's tokens so far)."""
    model = _rollout_model(arch, tmp_path)
    seen, sample = [], decode.sample
    monkeypatch.setattr(decode, "sample", lambda logits, *a: seen.append(logits.clone()) or sample(logits, *a))
    ps = _prompts()
    gen = torch.Generator().manual_seed(0)
    ro = generate_groups(model, ps, G, max_new_tokens=5, temperature=1.3, eos_token_id=EOS, generator=gen)
    steps = torch.stack(seen, 1)  # (B*G, steps, V): the logits each token was drawn from
    assert len(set(ro.completion_ids[:, 0].tolist())) > 3  # rows sample independently
    with torch.no_grad():
        for i, n in enumerate(ro.completion_lengths.tolist()):
            p = ps[i // G]
            own = model(torch.cat([p, ro.completion_ids[i, : n - 1]])[None]).logits[0, p.numel() - 1 :]  # (n, V)
            torch.testing.assert_close(steps[i, :n], own.float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["granite", "gemma2"])
def test_trainer_loss_equals_reference_on_own_logits(arch, tmp_path, trainer_cpu_path):
    """train.accumulate (packed hidden states, fused loss with the model's transform) against the float64 reference
    GRPO loss over the model's own logits, values and gradients."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(arch, tmp_path, vocab=len(tiny.build_tokenizer()))
    cfg = dataclasses.replace(Config(**PRESETS["tiny"]), group_size=3, micro_batch_groups=2, beta=0.04)
    cfg = dataclasses.replace(cfg, loss_type="grpo", temperature=0.9, max_new_tokens=6)
    roll = fixed_rollout(model.config.vocab_size, gen)
    adv = torch.randn(roll.completion_ids.shape[0], generator=gen)
    with torch.no_grad():
        logps = reference.selective_log_softmax(per_row_logits(model, roll).double(), roll.completion_ids, 0.9)
    old, ref = (logps + 0.3 * torch.randn(logps.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    mbs, row = train.micro_batches(roll, adv, cfg), 0
    for mb in mbs:
        n, T = mb["ids"].shape
        mb["old"], mb["ref"] = old[row : row + n, :T].float(), ref[row : row + n, :T].float()
        row += n
    model.zero_grad()
    loss, _ = train.accumulate(model, mbs, cfg)
    got = grads(model)
    model.zero_grad()
    want, metrics = reference.grpo_loss(
        per_row_logits(model, roll).double(), roll.completion_ids, roll.completion_mask, advantages=adv.double(),
        old_logps=old, ref_logps=ref, temperature=0.9, **config.loss_options(cfg),
    )  # fmt: skip
    want.backward()
    assert metrics["clip_ratio_low"] > 0 and metrics["clip_ratio_high"] > 0
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-4, atol=2e-5)
    for name, g in grads(model).items():
        scale = g.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got[name] / scale, g / scale, rtol=2e-4, atol=2e-5, msg=name)
