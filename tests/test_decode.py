"""The decode step (decode.py, sampling.py): compiled whole (CPU inductor here; CUDA graphs on the GPU check) it gives
the eager decode's tokens and log-probs; sampling from pre-drawn noise has the distribution softmax(filter(logits/T));
rollout log-probs equal the training forward's (sequence_logps); a step that cannot compile falls back with one line.

Cost: two inductor compiles of a 2-layer decode step (Llama, Qwen2, the Llama one with top-k and top-p sampling): about
55 s on 2 busy CPU cores with a cold inductor cache (the first compile also builds inductor's C++ prelude), 15 s warm.
"""

import logging
import math

import pytest
import torch
from test_rollout import EOS, PAD, prompts, tiny_model
from torch._dynamo.utils import counters

from grpo_fast import decode, generate_groups, sampling, sequence_logps
from grpo_fast.guard import check_model
from grpo_fast.rollout import NonFiniteLogits

G, BUDGET = 4, 12
SAMPLING = {"llama": dict(temperature=0.9, top_k=40, top_p=0.95), "qwen2": dict(temperature=1.0)}


def rollout(model, seed: int, compile_decode: bool, eos: int, **kw):
    gen = torch.Generator().manual_seed(seed)
    return generate_groups(
        model, prompts(), G, max_new_tokens=BUDGET, eos_token_id=eos, pad_token_id=PAD, generator=gen,
        return_logps=True, compile_decode=compile_decode, **kw,
    )  # fmt: skip


def eos_mid_budget(model, **kw) -> int:
    """A token that a seeded eager rollout first samples in row 0 at column 4: with it as EOS, that row stops in the
    middle of the budget (its earlier tokens, drawn from the same noise, are unchanged)."""
    ids = rollout(model, 0, False, EOS, **kw).completion_ids[0]
    return next(int(t) for t in ids[4:] if int(t) not in ids[:4].tolist())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_decode_equals_eager(arch, tmp_path, monkeypatch, caplog):
    model = tiny_model(arch, tmp_path)
    check_model(model)
    kw = SAMPLING[arch]
    eos = eos_mid_budget(model, **kw)
    eager = rollout(model, 0, False, eos, **kw)
    lengths = eager.completion_lengths
    assert eager.finished[0] and 5 <= lengths[0] < BUDGET and not eager.finished.all()  # EOS mid-budget in some rows

    eager_steps = []
    real_step = decode.step
    monkeypatch.setattr(decode, "step", lambda *a: eager_steps.append(1) or real_step(*a))
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    with caplog.at_level(logging.WARNING, logger="grpo_fast"):
        compiled = rollout(model, 0, True, eos, **kw)
    assert not eager_steps and not caplog.records  # every step ran the compiled graph: no fallback
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph: fullgraph=True traced the step whole
    assert sum(counters["graph_break"].values()) == breaks
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert torch.equal(compiled.completion_mask, eager.completion_mask)
    torch.testing.assert_close(compiled.logps, eager.logps, rtol=0, atol=1e-5)
    again = rollout(model, 1, True, eos, **kw)  # new buffers, same shapes: no recompile, and they are read
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert torch.equal(again.completion_ids, rollout(model, 1, False, eos, **kw).completion_ids)
    assert not torch.equal(again.completion_ids, eager.completion_ids)
    with torch.no_grad():  # non-finite logits: both decodes refuse the rollout alike (the compiled graph is reused)
        model.model.norm.weight.fill_(float("nan"))
    for compile_decode in (False, True):
        with pytest.raises(NonFiniteLogits, match="NaN or infinite"):
            rollout(model, 0, compile_decode, eos, **kw)
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_host_sync_in_step_falls_back_with_one_line(tmp_path, monkeypatch, caplog):
    """A step that asks the host for a value cannot compile whole: one warning naming the reason, then eager decode
    with the same tokens (and no second warning for the same model)."""
    model = tiny_model("llama", tmp_path)
    check_model(model)
    eager = rollout(model, 0, False, EOS)
    real_record = decode.record

    def record_with_sync(buf, logits, column, sampling):
        if int(buf.done.sum()) > buf.done.numel():  # a host sync (never true)
            raise AssertionError
        real_record(buf, logits, column, sampling)

    monkeypatch.setattr(decode, "record", record_with_sync)
    with caplog.at_level(logging.WARNING, logger="grpo_fast"):
        got = rollout(model, 0, True, EOS)
        rollout(model, 1, True, EOS)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "LlamaForCausalLM eagerly" in lines[0] and "does not compile whole" in lines[0], lines
    assert "\n" not in lines[0]
    assert torch.equal(got.completion_ids, eager.completion_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_captured_decode_on_cuda_equals_eager(arch, tmp_path, monkeypatch):
    """On CUDA the default decode is compiled and captured: one graph replay per step after the first, and the
    eager decode's tokens (fp32; no EOS, so every row decodes the whole budget)."""
    model = tiny_model(arch, tmp_path).cuda()
    ps = [p.cuda() for p in prompts()]
    replays, real = [], torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or real(graph))

    def run(compile_decode):
        gen = torch.Generator(device="cuda").manual_seed(0)
        return generate_groups(model, ps, G, max_new_tokens=BUDGET, eos_token_id=[], generator=gen, return_logps=True,
                               compile_decode=compile_decode)  # fmt: skip

    eager, captured = run(False), run(None)
    assert len(replays) == BUDGET - 2  # column 0 from the prefill, column 1 the warm-up step, then replays
    assert torch.equal(captured.completion_ids, eager.completion_ids)
    torch.testing.assert_close(captured.logps, eager.logps, rtol=0, atol=1e-4)


FILTERS = [dict(), dict(top_k=4), dict(top_p=0.7), dict(top_k=5, top_p=0.8)]


@pytest.mark.parametrize("filters", FILTERS, ids=["none", "top_k", "top_p", "both"])
def test_sampling_distribution_is_softmax_of_filtered_logits(filters):
    """60000 draws from one row of logits (V=9, T=0.7) against softmax(filter(logits / T)): Pearson's chi-square
    below its 1e-6 upper quantile, and filtered tokens never drawn."""
    logits = torch.tensor([2.0, -1.0, 0.5, 1.5, -3.0, 0.0, 1.0, -0.5, 2.2])
    temperature, n = 0.7, 60000
    kw = dict(top_k=0, top_p=1.0) | filters
    gen = torch.Generator().manual_seed(0)
    u = sampling.draw_noise(gen, 1, n, torch.device("cpu"))[0]
    draws = sampling.sample(logits.expand(n, -1), u, temperature, kw["top_k"], kw["top_p"])
    counts = torch.bincount(draws, minlength=logits.numel()).double()
    expected = torch.softmax(sampling.filter_logits(logits[None] / temperature, kw["top_k"], kw["top_p"])[0], -1)
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = float((((counts - n * expected.double()) ** 2)[kept] / (n * expected.double()[kept])).sum())
    dof = int(kept.sum()) - 1
    assert chi2 < chi2_upper(dof), (chi2, dof, counts, expected)


def chi2_upper(dof: int) -> float:
    """An upper bound on the 1 - 1e-6 quantile of chi-square(dof) (Laurent-Massart: P(X > k + 2 sqrt(k x) + 2x)
    <= exp(-x)), x = ln(1e6)."""
    x = math.log(1e6)
    return dof + 2 * math.sqrt(dof * x) + 2 * x


def test_rows_draw_independently():
    gen = torch.Generator().manual_seed(1)
    u = sampling.draw_noise(gen, 1, 64, torch.device("cpu"))[0]
    same = sampling.sample(torch.zeros(64, 50), u, 1.0, 0, 1.0)  # 64 independent draws, uniform over 50 tokens
    assert len(set(same.tolist())) > 20


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rollout_logps_equal_training_forward(arch, tmp_path):
    """Rollout.logps: log_softmax(logits / T) of the sampled tokens, unfiltered, equal to sequence_logps (the training
    forward) of the same completions; 0 where masked."""
    model = tiny_model(arch, tmp_path)
    temperature = 0.8
    ro = rollout(model, 0, False, EOS, temperature=temperature, top_k=20)
    with torch.no_grad():
        train = sequence_logps(model, prompts(), ro.completion_ids, ro.completion_mask, group_size=G,
                               temperature=temperature)  # fmt: skip
    active = ro.completion_mask.bool()
    torch.testing.assert_close(ro.logps[active], train[active], rtol=0, atol=2e-6)
    assert ro.logps.dtype == torch.float32 and (ro.logps[~active] == 0).all()
    assert generate_groups(model, prompts(), G, max_new_tokens=3).logps is None


def test_bad_options(tmp_path):
    model = tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match="return_logps needs temperature > 0"):
        generate_groups(model, prompts(), G, max_new_tokens=3, temperature=0, return_logps=True)
    with pytest.raises(TypeError, match="compile_decode must be a bool or None"):
        generate_groups(model, prompts(), G, max_new_tokens=3, compile_decode="yes")
    with pytest.raises(TypeError, match="return_logps must be a bool"):
        generate_groups(model, prompts(), G, max_new_tokens=3, return_logps=1)
