"""logit_transform: the one place that reads how a causal LM forms its logits, checked against each model's OWN
forward (tiny random configs saved and loaded back), and its refusals of what it cannot express."""

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, LlamaConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from grpo_fast.logit_head import LogitTransform, check_head, logit_transform

SMALL = dict(
    vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FULL = ["full_attention"] * 2  # no sliding-window layers: only the head matters here
CASES = {  # model type -> config fields (a transform small enough that the softcap bends the logits)
    "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=0.125),
    "cohere2": dict(logit_scale=0.5, layer_types=FULL),
    "gemma2": dict(final_logit_softcapping=0.9, query_pre_attn_scalar=8, layer_types=FULL),
    "gemma3_text": dict(final_logit_softcapping=1.3, query_pre_attn_scalar=8, layer_types=FULL),
    "vaultgemma": dict(final_logit_softcapping=0.7, query_pre_attn_scalar=8, layer_types=FULL),
    "nanochat": dict(final_logit_softcapping=1.1),
    "recurrent_gemma": dict(logits_soft_cap=0.8, use_cache=False),
    "hyperclovax": dict(logits_scaling=2.5),  # multiplies, where Granite divides
    "falcon_h1": dict(
        lm_head_multiplier=0.3, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8
    ),
    "minicpm3": dict(dim_model_base=8, num_key_value_heads=4, head_dim=None, kv_lora_rank=16, q_lora_rank=16)
    | dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),  # MLA attention, small
    "inkling_text": dict(logits_mup_width_multiplier=3.0, swa_head_dim=8, sliding_window_size=16, rel_extent=16)
    | dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2),  # sliding and MoE layers, small
    "mpt": dict(logit_scale=3.0),  # in the config, never applied by MptForCausalLM
    "llama": {},
}


def _tiny(model_type: str, tmp_path, **fields):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](**{**SMALL, **fields})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    return AutoModelForCausalLM.from_pretrained(tmp_path / model_type, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", CASES)
def test_transform_matches_the_models_own_logits(model_type, tmp_path):
    model = _tiny(model_type, tmp_path, **CASES[model_type])
    transform = logit_transform(model)
    ids = torch.randint(3, 67, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # (2, 9, 32), after the final norm
        head = model.get_output_embeddings()
        z = torch.nn.functional.linear(hidden, head.weight, head.bias)
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(transform(z), logits, rtol=1e-5, atol=1e-6)
    if model_type in ("llama", "mpt"):
        assert transform.identity
    else:  # the transform matters: the plain head would be off
        assert not transform.identity and (z - logits).abs().max() > 1e-2


def test_transform_math_and_derivative():
    z = torch.linspace(-40, 40, 801, dtype=torch.float64, requires_grad=True)
    for t in (LogitTransform(), LogitTransform(0.25), LogitTransform(1.0, 2.0), LogitTransform(3.0, 1.5)):
        expected = t.scale * z if t.softcap is None else t.softcap * torch.tanh(t.scale * z / t.softcap)
        torch.testing.assert_close(t(z), expected)
        (grad,) = torch.autograd.grad(expected.sum(), z)
        torch.testing.assert_close(torch.as_tensor(t.derivative(z.detach()), dtype=torch.float64).expand(801), grad)
    assert LogitTransform().identity and LogitTransform(2.0, 30.0).kwargs() == {"logit_scale": 2.0, "softcap": 30.0}


def test_refuses_what_it_cannot_express(tmp_path):
    base = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="final_logits_temperature"):
        logit_transform(LlamaConfig(**base, final_logits_temperature=0.7))  # an unknown transform is not ignored
    with pytest.raises(ValueError, match="logit_scale=0.5, logits_scaling=4.0"):
        logit_transform(CONFIG_MAPPING["granite"](**base, logits_scaling=4.0, logit_scale=0.5))
    with pytest.raises(ValueError, match="logits_scaling"):
        logit_transform(CONFIG_MAPPING["granite"](**base, logits_scaling=0.0))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        logit_transform(CONFIG_MAPPING["gemma2"](**base, final_logit_softcapping=-30.0))
    with pytest.raises(ValueError, match="softcap"):
        LogitTransform(1.0, float("nan"))
    with pytest.raises(ValueError, match="logit_scale"):
        LogitTransform(True)
    with pytest.raises(TypeError, match="transformers model or config, got Linear"):
        logit_transform(torch.nn.Linear(4, 5))


def test_refuses_heads_that_are_not_plain_linear(tmp_path):
    from peft import LoraConfig, get_peft_model

    class ScaledHead(torch.nn.Linear):  # like Dory's learned per-token scale
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="ScaledHead computes more than"):
        check_head(ScaledHead(4, 5))
    check_head(torch.nn.Linear(4, 5))
    model = _tiny("llama", tmp_path)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="LoRA-wrapped"):
        logit_transform(lora)
    model = _tiny("minicpm3", tmp_path / "b", **CASES["minicpm3"])
    model.lm_head = torch.nn.Linear(32, 67, bias=True)  # dividing the hidden states is not a logit scale then
    with pytest.raises(ValueError, match="logits_scaling scales the hidden states before a biased LM head"):
        logit_transform(model)


def test_every_causal_lm_config_reads_or_is_refused():
    """Every causal LM config transformers ships (defaults): a LogitTransform or a ValueError, and a known field
    with a non-neutral value is never read as the identity (MPT's unused logit_scale aside)."""
    fields = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "final_logit_softcapping")
    read = 0
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # some configs cannot be built from defaults alone: nothing to read
            continue
        try:
            transform = logit_transform(config)
        except ValueError:
            continue
        read += 1
        text = config.get_text_config()
        set_fields = [f for f in fields if getattr(text, f, None) not in (None, 1, 1.0)]
        if set_fields and model_type != "mpt":
            assert not transform.identity, (model_type, set_fields)
    assert read > 100
