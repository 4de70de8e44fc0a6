"""Shared-prefix engine benchmark (issue 4) on a Qwen2.5-1.5B-shaped model (real sizes, random weights, bf16).

- rollouts: `generate_groups` (prompt prefilled once, its K/V stored once, cascade attention) against
  transformers' `generate(num_return_sequences=G)`; tokens/s of completions and peak memory. No EOS: every
  row decodes all `new` tokens, so both sides do the same work.
- training: forward + backward of `sequence_logps`, one group packed as [P | C1..CG] (shared) against G rows
  [P | Ci] (unshared); time and peak memory, gradient checkpointing on (the memory recipe).

`--quick` runs a tiny config on CPU (a smoke run; the numbers mean nothing). Last stdout line: one JSON object.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from grpo_fast import generate_groups, sequence_logps  # noqa: E402

SUITE = "engine"
QWEN25_15B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip
ROLLOUT_CASES = [(1024, 256, 8), (256, 512, 8)]  # (prompt, new tokens, G)
TRAIN_CASES = [(1024, 256, 8), (256, 512, 8), (4096, 1024, 8)]  # (Lp, Lc, G)
QUICK_ROLLOUT, QUICK_TRAIN = [(32, 8, 4)], [(32, 8, 4), (8, 16, 4)]


def build_model(quick: bool, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(TINY if quick else QWEN25_15B), eos_token_id=None, pad_token_id=0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: 1.5B random weights are slow to init on CPU
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: decode every requested token
    model.generation_config.pad_token_id = 0
    return model


def wall_ms(fn, device: torch.device, reps: int) -> dict:
    """Median wall time of whole calls (a rollout is seconds long: do_bench's repeat logic would run it ~10x)."""
    fn()
    times = []
    for _ in range(reps):
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "lo_ms": min(times), "hi_ms": max(times), "spread": "min-max"}


def kv_mb(config, tokens: int, dtype: torch.dtype) -> float:
    """K and V of `tokens` positions over all layers."""
    head_dim = config.hidden_size // config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * elem / 1e6


def measured_row(case, mode, name, fn, device, quick: bool, completion_tokens: int, extra: dict) -> dict:
    """Wall time, peak memory and completion tokens/s of `fn`; a failure becomes an error row."""
    try:
        timing = wall_ms(fn, device, reps=1 if quick else 3)
        peak = common.peak_memory_mb(fn, device)
        tps = completion_tokens / (timing["median_ms"] / 1e3)
        return common.row(SUITE, case, mode, name, **timing, peak_mb=peak, tokens_per_s=tps, **extra)
    except Exception as e:  # a failing provider is a row, never a crash of the suite
        return common.failed_row(SUITE, case, mode, name, e)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def rollout_providers(model, prompt: torch.Tensor, G: int, new: int) -> dict:
    gen = torch.Generator(device=prompt.device).manual_seed(0)
    return {
        "grpo_fast": lambda: generate_groups(model, [prompt], G, max_new_tokens=new, generator=gen),
        "transformers": lambda: model.generate(
            prompt[None], do_sample=True, num_return_sequences=G, max_new_tokens=new, min_new_tokens=new
        ),
    }


def train_step(model, prompts, ids, mask, G: int, shared: bool):
    def step():
        model.zero_grad(set_to_none=True)
        sequence_logps(model, prompts, ids, mask, group_size=G, shared_prefix=shared).sum().backward()

    return step


def rollout_rows(model, quick: bool, device: torch.device) -> list[dict]:
    rows, V = [], model.config.vocab_size
    for Lp, new, G in QUICK_ROLLOUT if quick else ROLLOUT_CASES:
        case = f"Lp={Lp} new={new} G={G}"
        providers = rollout_providers(model, torch.randint(3, V, (Lp,), device=device), G, new)
        stored = {"grpo_fast": Lp, "transformers": G * Lp}  # prompt K/V positions each keeps
        for name, fn in providers.items():
            extra = {"prompt_kv_mb": kv_mb(model.config, stored[name], model.dtype)}
            rows.append(measured_row(case, "rollout", name, fn, device, quick, G * new, extra))
    return rows


def training_rows(model, quick: bool, device: torch.device) -> list[dict]:
    rows, V = [], model.config.vocab_size
    model.gradient_checkpointing_enable()
    model.train()
    for Lp, Lc, G in QUICK_TRAIN if quick else TRAIN_CASES:
        case = f"Lp={Lp} Lc={Lc} G={G}"
        prompts = [torch.randint(3, V, (Lp,), device=device)]
        ids = torch.randint(3, V, (G, Lc), device=device)
        mask = torch.ones(G, Lc, dtype=torch.long, device=device)
        for shared in (True, False):
            step = train_step(model, prompts, ids, mask, G, shared)
            extra = {"tokens": Lp + G * (Lc - 1) if shared else G * (Lp + Lc - 1)}  # decoder token-forwards
            name = "shared" if shared else "unshared"
            rows.append(measured_row(case, "fwd+bwd", name, step, device, quick, G * Lc, extra))
    model.zero_grad(set_to_none=True)
    return rows


def run(quick: bool, device: torch.device, ceilings: dict) -> list[dict]:
    # generate() runs on SDPA; sequence_logps then points the model at the engine's packed attention (FlexAttention
    # on CUDA), after the guard's one check of the model (guard.py)
    model = build_model(quick, device)
    return rollout_rows(model, quick, device) + training_rows(model, quick, device)


if __name__ == "__main__":
    common.main(SUITE, run)
