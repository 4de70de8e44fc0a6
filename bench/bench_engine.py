"""Shared-prefix engine benchmark (issues 4 and 12) on Qwen2.5-shaped models (real sizes, random weights, bf16).

- rollout: `generate_groups` (prompt prefilled once, its K/V stored once, cascade attention) with the decode step
  eager (`grpo_fast[eager]`) and compiled whole, replayed as a CUDA graph on CUDA (`grpo_fast[compiled]`), against
  transformers' `generate(num_return_sequences=G)`; completion tokens/s, prefill and decode time separately
  (generate_groups only), peak memory. No EOS: every row decodes all `new` tokens, so every side does the same work.
- ops/step: the host work of one decode step, counted (bench/opcount.py): CUDA kernels and host launch calls, or
  on CPU the aten ops dispatched (eager) and the compiled graph's kernel calls. Counts are deterministic: they may
  be quoted from any machine, timings only from a quiet one.
- logp_diff: the rollout's own log-probs of its tokens against the training forward's (`sequence_logps`), in the
  model's dtype (bf16 on CUDA): the trainer's rollout_logp_diff_* metrics (grpo_fast/rollout_agreement.py).
- training: forward + backward of `sequence_logps`, one group packed as [P | C1..CG] (shared) against G rows
  [P | Ci] (unshared); time and peak memory, gradient checkpointing on (the memory recipe).

frac_floor = the physical floor / the median time: a rollout cannot beat the prefill's 2*P FLOPs per prompt token at
the measured matmul rate plus one read of the P weights per decode step at the measured copy bandwidth (small-batch
decode is bound by it); a training step cannot beat 6*P FLOPs per token of the shared packing (Lp + G*Lc tokens).
On a CPU the cases use a small 4-layer config (its op counts are worth quoting, not its timings); `--quick` runs a
tiny config (a smoke run, without the compiled decode: its CPU compile alone outlasts the run); --headline runs the
Qwen2.5-0.5B cases.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common, opcount  # noqa: E402
from grpo_fast import generate_groups, rollout, sequence_logps  # noqa: E402
from grpo_fast.rollout_agreement import agreement_metrics  # noqa: E402

SUITE = "engine"
SHAPES = {
    **common.QWEN25,
    "small": dict(  # CPU runs: counts to quote, timings not
        vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    mode: str  # "rollout" (Lc = new tokens per row) or "fwd+bwd" (Lc = completion length)
    shape: str
    Lp: int
    Lc: int
    G: int
    headline: bool = False  # run by --headline

    @property
    def name(self) -> str:
        return f"{self.shape} Lp={self.Lp} {'new' if self.mode == 'rollout' else 'Lc'}={self.Lc} G={self.G}"


R, T = "rollout", "fwd+bwd"
CASES = [Case(R, "qwen2.5-0.5b", 256, 128, 8, True), Case(R, "qwen2.5-1.5b", 1024, 256, 8),
         Case(R, "qwen2.5-1.5b", 256, 512, 8), Case(T, "qwen2.5-0.5b", 1024, 256, 8, True),
         Case(T, "qwen2.5-1.5b", 1024, 256, 8), Case(T, "qwen2.5-1.5b", 256, 512, 8),
         Case(T, "qwen2.5-1.5b", 4096, 1024, 8)]  # fmt: skip
CPU_CASES = [Case(R, "small", 64, 32, 8, True), Case(T, "small", 256, 64, 8, True)]
QUICK = [Case(R, "tiny", 32, 8, 4, True), Case(T, "tiny", 32, 8, 4, True), Case(T, "tiny", 8, 16, 4)]
ROLLOUTS = ("grpo_fast[eager]", "grpo_fast[compiled]", "transformers")
COUNT_BUDGETS = (8, 24)  # generate's per-step counts: the difference of two budgets


def build_model(shape: str, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], eos_token_id=None, pad_token_id=0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: 1.5B random weights are slow to init on CPU
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: decode every requested token
    model.generation_config.pad_token_id = 0
    return model.eval()


def kv_mb(config, tokens: int, dtype: torch.dtype) -> float:
    """K and V of `tokens` positions over all layers."""
    head_dim = config.hidden_size // config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * elem / 1e6


def weights(model) -> tuple[int, int]:
    """(parameters, bytes) of the model, tied embeddings once."""
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@contextlib.contextmanager
def prefill_clock(device: torch.device, seconds: list):
    """Times every generate_groups prefill (rollout._prefill) into `seconds`, synchronized on CUDA."""
    real = rollout._prefill

    def timed(*args, **kwargs):
        common.sync(device)
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        common.sync(device)
        seconds.append(time.perf_counter() - t0)
        return out

    rollout._prefill = timed
    try:
        yield
    finally:
        rollout._prefill = real


def wall_ms(fn, device: torch.device, reps: int) -> dict:
    """Median wall time of whole calls after one warm-up call (compilation, capture, allocator); prefill_ms and
    decode_ms split generate_groups' calls (a rollout is seconds long: do_bench's repeat logic would run it ~10x)."""
    fn()
    times, prefills = [], []
    for _ in range(reps):
        with prefill_clock(device, prefills):
            common.sync(device)
            t0 = time.perf_counter()
            fn()
            common.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"median_ms": statistics.median(times), "lo_ms": min(times), "hi_ms": max(times), "spread": "min-max"}
    if prefills:
        out["prefill_ms"] = 1e3 * statistics.median(prefills)
        out["decode_ms"] = out["median_ms"] - out["prefill_ms"]
    return out


def measured_row(case, mode, name, fn, device, reps: int, extra: dict, tokens: int, floor_s: float) -> dict:
    """Wall time, peak memory, tokens/s and frac_floor of `fn`; a failure becomes an error row."""
    try:
        timing = wall_ms(fn, device, reps)
        peak = common.peak_memory_mb(fn, device)
        seconds = timing["median_ms"] / 1e3
        rates = {"tokens_per_s": tokens / seconds, "frac_floor": floor_s / seconds}
        if "decode_ms" in timing:
            rates["decode_tokens_per_s"] = tokens / (timing["decode_ms"] / 1e3)
        return common.stream(common.row(SUITE, case, mode, name, **timing, peak_mb=peak, **rates, **extra))
    except Exception as e:  # a failing provider is a row, never a crash of the suite
        return common.stream(common.failed_row(SUITE, case, mode, name, e))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def rollout_fn(model, provider: str, prompt: torch.Tensor, G: int):
    """provider's rollout of `new` tokens per row: fn(new)."""
    gen = torch.Generator(device=prompt.device).manual_seed(0)
    if provider == "transformers":
        return lambda new: model.generate(
            prompt[None], do_sample=True, num_return_sequences=G, max_new_tokens=new, min_new_tokens=new
        )
    compiled = provider == "grpo_fast[compiled]"  # with the log-probs, as the trainer samples (one compiled graph)
    kw = dict(generator=gen, compile_decode=compiled, return_logps=True)
    return lambda new: generate_groups(model, [prompt], G, max_new_tokens=new, **kw)


def ops_row(case: str, provider: str, run, new: int, device: torch.device) -> dict:
    """Host work per decode step (bench/opcount.py)."""
    try:
        if provider == "transformers":
            counts = opcount.difference_per_step(run, COUNT_BUDGETS, device)
        else:
            counts = opcount.generate_groups_per_step(lambda: run(new), device, provider == "grpo_fast[compiled]")
        return common.stream(common.row(SUITE, case, "ops/step", provider, **counts))
    except Exception as e:  # counting must not take the suite down (a profiler quirk on some platform)
        return common.stream(common.failed_row(SUITE, case, "ops/step", provider, e))


@torch.no_grad()
def agreement_row(model, c: Case, prompt: torch.Tensor) -> dict:
    """Rollout vs training log-probs of the same tokens (default decode: compiled on CUDA)."""
    try:
        gen = torch.Generator(device=prompt.device).manual_seed(1)
        ro = generate_groups(model, [prompt], c.G, max_new_tokens=c.Lc, generator=gen, return_logps=True)
        train = sequence_logps(model, [prompt], ro.completion_ids, ro.completion_mask, group_size=c.G)
        found = agreement_metrics([dict(old=train, sampling=ro.logps, mask=ro.completion_mask)])
        return common.stream(common.row(SUITE, c.name, "logp_diff", "grpo_fast", **found))
    except Exception as e:  # a failing measurement is a row, never a crash of the suite
        return common.stream(common.failed_row(SUITE, c.name, "logp_diff", "grpo_fast", e))


def rollout_rows(model, c: Case, quick: bool, device, ceilings) -> list[dict]:
    case, Lp, new, G = c.name, c.Lp, c.Lc, c.G
    prompt = torch.randint(3, model.config.vocab_size, (Lp,), device=device)
    params, param_bytes = weights(model)
    floor_s = 2 * params * Lp / (ceilings["matmul_tflops"] * 1e12) + new * param_bytes / (ceilings["copy_gbps"] * 1e9)
    stored = {"grpo_fast[eager]": Lp, "grpo_fast[compiled]": Lp, "transformers": G * Lp}  # prompt K/V positions
    rows = []
    for provider in ROLLOUTS:
        if quick and provider == "grpo_fast[compiled]" and device.type == "cpu":
            why = "not run in --quick on CPU: an inductor compile takes ~20 s (tests/test_decode.py checks it)"
            rows += [common.stream(common.row(SUITE, case, mode, provider, "skipped", why)) for mode in (R, "ops/step")]
            continue
        run = rollout_fn(model, provider, prompt, G)
        extra = {"prompt_kv_mb": kv_mb(model.config, stored[provider], model.dtype)}
        reps = 1 if quick or device.type == "cuda" else 3  # a GPU rollout is stable; its compile is paid once
        call = lambda run=run: run(new)  # noqa: E731
        rows.append(measured_row(case, "rollout", provider, call, device, reps, extra, G * new, floor_s))
        rows.append(ops_row(case, provider, run, new, device))
    return rows + [agreement_row(model, c, prompt)]


def training_rows(model, c: Case, quick: bool, device, ceilings) -> list[dict]:
    V, rows, Lp, Lc, G, case = model.config.vocab_size, [], c.Lp, c.Lc, c.G, c.name
    prompts = [torch.randint(3, V, (Lp,), device=device)]
    ids = torch.randint(3, V, (G, Lc), device=device)
    mask = torch.ones(G, Lc, dtype=torch.long, device=device)
    floor_s = 6 * weights(model)[0] * (Lp + G * Lc) / (ceilings["matmul_tflops"] * 1e12)
    model.gradient_checkpointing_enable()
    model.train()
    for shared in (True, False):

        def step(shared=shared):
            model.zero_grad(set_to_none=True)
            sequence_logps(model, prompts, ids, mask, group_size=G, shared_prefix=shared).sum().backward()

        extra = {"tokens": Lp + G * (Lc - 1) if shared else G * (Lp + Lc - 1)}  # decoder token-forwards
        name, reps = ("shared" if shared else "unshared"), (1 if quick else 3)
        rows.append(measured_row(case, "fwd+bwd", name, step, device, reps, extra, G * Lc, floor_s))
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    return rows


def run(quick: bool, device: torch.device, ceilings: dict, select=common.EVERYTHING) -> list[dict]:
    """Rollout and ops/step rows per rollout case, then training rows; one model per shape. generate() runs on SDPA;
    generate_groups and sequence_logps point the model at the engine's attention (FlexAttention on CUDA) after the
    guard's one check of the model (guard.py)."""
    if device.type == "cpu":
        opcount.enable_cpu_kernel_profile()  # before the compiled decode step is built
    cases, rows = select.cases(QUICK if quick else CASES if device.type == "cuda" else CPU_CASES), []
    for shape in dict.fromkeys(c.shape for c in cases):
        model = build_model(shape, device)
        for c in (c for c in cases if c.shape == shape):
            rows += (rollout_rows if c.mode == R else training_rows)(model, c, quick, device, ceilings)
        del model
    return rows


if __name__ == "__main__":
    common.main(SUITE, run)
