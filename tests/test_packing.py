"""sequence_logps / completion_hidden_states: the packed shared-prefix forward equals G ordinary rows and a plain
per-row forward of the model (full logits + log_softmax), values and parameter gradients, Llama and Qwen2 (GQA)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from grpo_fast.attention import flex_mask_mod, packed_mask
from grpo_fast.packing import completion_hidden_states, lm_head, pack, sequence_logps

V, EOS, G = 101, 2, 3
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, eos_token_id=EOS, pad_token_id=0,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=48, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False,
    ),
}  # fmt: skip


def tiny_model(arch: str, tmp_path, checkpointing: bool = True):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[arch]()).save_pretrained(tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch, attn_implementation="sdpa", dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def batch():
    """2 prompts of different lengths, G=3 completions each: EOS-terminated of different lengths, one cut at Tc,
    one of a single token, one empty (all masked). Ids after the mask are junk, as a pad may be any id."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=gen) for n in (7, 4)]
    lengths = torch.tensor([5, 8, 1, 3, 0, 6])
    ids = torch.randint(3, V, (2 * G, 8), generator=gen)
    ids[torch.arange(2 * G), (lengths - 1).clamp(min=0)] = EOS
    ids[1, 7] = 17  # row 1 runs to Tc without EOS
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    return prompts, ids, mask


def plain_logps(model, prompts, ids, mask):
    """Reference: one forward per row [P | Ci] with full logits and log_softmax."""
    out = torch.zeros(ids.shape)
    for r in range(ids.shape[0]):
        p, n = prompts[r // G], int(mask[r].sum())
        logits = model(torch.cat([p, ids[r, :n]])[None]).logits[0, p.numel() - 1 : -1].float()  # (n, V)
        out[r, :n] = torch.log_softmax(logits, -1).gather(-1, ids[r, :n, None]).squeeze(-1)
    return out


def value_and_grads(model, fn):
    model.zero_grad()
    logps = fn()
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_equals_unshared_equals_plain(arch, tmp_path):
    model = tiny_model(arch, tmp_path)
    prompts, ids, mask = batch()
    ref, ref_grads = value_and_grads(model, lambda: plain_logps(model, prompts, ids, mask))
    for shared in (True, False):
        got, grads = value_and_grads(
            model, lambda shared=shared: sequence_logps(model, prompts, ids, mask, group_size=G, shared_prefix=shared)
        )
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert (got[mask == 0] == 0).all()
        assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=f"{arch} {shared} {name}")


def test_temperature_and_hidden_states(tmp_path):
    model = tiny_model("llama", tmp_path, checkpointing=False)
    prompts, ids, mask = batch()
    hidden = completion_hidden_states(model, prompts, ids, mask, group_size=G)  # (B*G, Tc, H)
    assert hidden.shape == (2 * G, 8, 32) and (hidden[mask == 0] == 0).all()
    weight, bias = lm_head(model)
    assert weight is model.lm_head.weight and bias is None
    with torch.no_grad():
        logits = hidden @ weight.T  # (B*G, Tc, V)
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1) * mask
        got = sequence_logps(model, prompts, ids, mask, group_size=G, temperature=0.7)
        unshared = completion_hidden_states(model, prompts, ids, mask, group_size=G, shared_prefix=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unshared, hidden, atol=1e-5, rtol=1e-5)


def test_packed_layout_saves_the_prompt():
    prompts, ids, mask = batch()
    lengths = mask.sum(1).tolist()
    shared = pack(prompts, ids, lengths, G, shared_prefix=True)
    unshared = pack(prompts, ids, lengths, G, shared_prefix=False)
    # group 0: 7 + (4 + 7 + 0) inputs; every completion's last token is never an input
    assert shared.input_ids.shape == (2, 18) and unshared.input_ids.shape == (6, 14)
    assert shared.position_ids[0, 7:11].tolist() == [7, 8, 9, 10] and shared.position_ids[0, 11].item() == 7
    assert shared.segments[1, 4:].tolist()[:7] == [1, 1, 3, 3, 3, 3, 3] and shared.segments[1, -1] == -1
    assert shared.dst.numel() == sum(lengths) == unshared.dst.numel()


def test_lora_gradients_match(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen2", tmp_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # lora_B starts at 0: make the adapters matter
            torch.nn.init.normal_(p, std=0.1)
    prompts, ids, mask = batch()
    ref, ref_grads = value_and_grads(model, lambda: plain_logps(model, prompts, ids, mask))
    got, grads = value_and_grads(model, lambda: sequence_logps(model, prompts, ids, mask, group_size=G))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 8 and all("lora" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_equals_dense_mask(window):
    """The FlexAttention mask_mod, evaluated the way create_block_mask does (vmapped over index scalars), keeps
    exactly the dense mask's entries: kv <= q, prompt or own segment, and pos[q] - pos[kv] < window."""
    from torch.nn.attention.flex_attention import create_mask

    prompts, ids, mask = batch()
    packed = pack(prompts, ids, mask.sum(1).tolist(), G, shared_prefix=True)
    R, L = packed.segments.shape
    dense = packed_mask(packed.segments, packed.position_ids, "sdpa", window)  # (R, 1, L, L)
    mod = flex_mask_mod(packed.segments, packed.position_ids, window)
    assert torch.equal(create_mask(mod, R, 1, L, L, device="cpu"), dense)
    pos, seg = packed.position_ids[1], packed.segments[1]  # row 1: prompt 4, completion inputs 2, 0, 5 tokens
    q = 9  # the 4th input of completion 3, at position 7
    assert seg[q] == 3 and pos[q] == 7
    want = [kv <= q and (seg[kv] == 0 or seg[kv] == 3) and (window is None or 7 - pos[kv] < window) for kv in range(L)]
    assert dense[1, 0, q].tolist() == want and sum(want) == (8 if window is None else 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention BlockMask path needs CUDA")
def test_flex_matches_sdpa_on_cuda(tmp_path):
    model = tiny_model("llama", tmp_path, checkpointing=False).cuda()
    prompts, ids, mask = batch()
    prompts, ids, mask = [p.cuda() for p in prompts], ids.cuda(), mask.cuda()
    sdpa, sdpa_grads = value_and_grads(
        model, lambda: sequence_logps(model, prompts, ids, mask, group_size=G, attention="sdpa")
    )
    flex, flex_grads = value_and_grads(
        model, lambda: sequence_logps(model, prompts, ids, mask, group_size=G, attention="flex")
    )
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-4)
    for name, g in flex_grads.items():
        torch.testing.assert_close(g, sdpa_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_bad_input(tmp_path):
    model = tiny_model("llama", tmp_path, checkpointing=False)
    prompts, ids, mask = batch()
    call = lambda **kw: sequence_logps(
        model, kw.get("prompts", prompts), kw.get("ids", ids), kw.get("mask", mask),
        group_size=kw.get("group_size", G), attention=kw.get("attention", "auto"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        call(prompts=[prompts[0], prompts[0][:0]])
    with pytest.raises(ValueError, match="group_size"):
        call(group_size=0)
    with pytest.raises(ValueError, match="completion_ids has 6 rows"):
        call(group_size=2)
    with pytest.raises(ValueError, match="completion_mask must have shape"):
        call(mask=mask[:, :5])
    with pytest.raises(ValueError, match="completion_mask must hold 1s then 0s"):
        call(mask=mask.flip(1))
    with pytest.raises(ValueError, match="completion_ids has values outside"):
        call(ids=ids + V)
    with pytest.raises(ValueError, match="position limit"):
        call(prompts=[torch.randint(3, V, (42,)), prompts[1]])
    with pytest.raises(ValueError, match="attention"):
        call(attention="flash")
    with pytest.raises(TypeError, match="prompts"):
        call(prompts=[p.tolist() for p in prompts])
