"""generate_groups: greedy equals transformers' generate, each prompt passes through the model once per group,
rows sample independently and reproducibly, EOS stops a row and its mask (Llama and Qwen2, GQA)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from grpo_fast import Rollout, generate_groups
from grpo_fast.guard import check_model

V, EOS, PAD, G = 101, 2, 0, 4
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, eos_token_id=EOS, pad_token_id=PAD,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=32, eos_token_id=EOS, pad_token_id=PAD,
    ),
}  # fmt: skip


def tiny_model(arch: str, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[arch]()).save_pretrained(tmp_path / arch)
    return AutoModelForCausalLM.from_pretrained(tmp_path / arch, attn_implementation="sdpa", dtype=torch.float32)


def prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, V, (n,), generator=gen) for n in (6, 3, 9)]


def greedy_reference(model, prompt, max_new_tokens, eos):
    out = model.generate(
        prompt[None], max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=PAD
    )
    return out[0, prompt.numel() :]


@torch.no_grad()
def greedy_tokens(model, prompt, n):
    """n argmax tokens from full forwards, no EOS."""
    x = prompt[None]
    for _ in range(n):
        x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, prompt.numel() :]


def check_invariants(ro: Rollout, eos: int) -> None:
    """The mask is 1 up to and including the first EOS, then 0, and the ids there are the pad."""
    for ids, mask, n in zip(ro.completion_ids, ro.completion_mask, ro.completion_lengths):
        hits = (ids[: int(n)] == eos).nonzero()
        end = int(hits[0]) + 1 if hits.numel() else int(n)
        assert int(n) == end and mask[:end].all() and not mask[end:].any()
        assert (ids[end:] == PAD).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_generate_and_prefills_once(arch, tmp_path):
    model = tiny_model(arch, tmp_path)
    ps = prompts()
    # an EOS the greedy path actually emits, so rows stop early and at different steps
    eos = int(greedy_tokens(model, ps[0], 5)[4])
    stop = int((greedy_tokens(model, ps[0], 5) == eos).nonzero()[0]) + 1
    check_model(model)  # the guard's forwards come on a model's first use: run them before counting
    calls = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    ro = generate_groups(model, ps, G, max_new_tokens=7, temperature=0, eos_token_id=eos, pad_token_id=PAD)
    hook.remove()
    # each prompt once at batch 1, then B*G rows of one token per decode step
    assert calls[:3] == [(1, p.numel()) for p in ps]
    assert set(calls[3:]) == {(3 * G, 1)} and len(calls) - 3 <= 6
    assert ro.completion_ids.shape[0] == 3 * G and ro.group_size == G and ro.prompts[1] is ps[1]
    for b, p in enumerate(ps):
        ref = greedy_reference(model, p, 7, eos)
        assert ro.completion_lengths[b * G : (b + 1) * G].eq(ref.numel()).all()  # generate stops at EOS too
        assert ro.completion_ids[b * G : (b + 1) * G, : ref.numel()].eq(ref).all()
    assert ro.finished[0] and ro.completion_lengths[0] == stop
    check_invariants(ro, eos)


def test_sampling_independent_and_reproducible(tmp_path):
    model = tiny_model("llama", tmp_path)
    run = lambda seed, **kw: generate_groups(
        model, prompts(), G, max_new_tokens=6, eos_token_id=EOS, generator=torch.Generator().manual_seed(seed), **kw
    )
    a, b, c = run(0), run(0), run(1, temperature=1.3, top_k=20, top_p=0.9)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    for ro in (a, c):
        first = ro.completion_ids[:, 0].view(3, G)
        assert all(len(set(row.tolist())) > 1 for row in first), first
        check_invariants(ro, EOS)
    # top_k=1 and a tiny top_p keep only the most likely token: the sampled rows equal greedy
    greedy = generate_groups(model, prompts(), G, max_new_tokens=6, temperature=0, eos_token_id=EOS)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        assert torch.equal(run(5, temperature=0.8, **kw).completion_ids, greedy.completion_ids)


def test_eos_stops_every_row_early(tmp_path):
    model = tiny_model("qwen2", tmp_path)
    ps = prompts()
    firsts = {int(greedy_tokens(model, p, 1)[0]) for p in ps}
    ro = generate_groups(model, ps, 2, max_new_tokens=20, temperature=0, eos_token_id=sorted(firsts))
    assert ro.completion_ids.shape == (6, 1) and ro.completion_mask.eq(1).all() and ro.finished.all()


def test_bad_input(tmp_path):
    model = tiny_model("llama", tmp_path)
    ps = prompts()
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        generate_groups(model, [ps[0][:0]], G, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        generate_groups(model, [], G, max_new_tokens=4)
    with pytest.raises(ValueError, match="group_size"):
        generate_groups(model, ps, 0, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_groups(model, ps, G, max_new_tokens=0)
    with pytest.raises(ValueError, match="position limit"):
        generate_groups(model, ps, G, max_new_tokens=30)
    with pytest.raises(ValueError, match=r"prompts\[1\] must have 1 dimensions"):
        generate_groups(model, [ps[0], ps[1][None]], G, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[0\] has values outside"):
        generate_groups(model, [ps[0] + V], G, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate_groups(model, ps, G, max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate_groups(model, ps, G, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate_groups(model, ps, G, max_new_tokens=4, eos_token_id=-3)
