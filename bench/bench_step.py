"""One full GRPO step (rollout + update) of the trainer against TRL's GRPOTrainer (issue 5).

Qwen2.5-0.5B- and 1.5B-shaped models (real configs, random weights, bf16 on CUDA), LoRA r=16 on the attention
and MLP projections, gradient checkpointing, G=8, 4 prompts of 256 tokens, 512 new tokens (random weights
rarely emit EOS, so every row decodes about 512 tokens on both sides), beta=0, dapo loss, one optimizer step
over micro-batches of one group (TRL: per_device_train_batch_size=G, gradient_accumulation_steps=4).

- grpo_fast: the trainer's own functions (train.sample, micro_batches, update): shared-prefix rollout (the decode
  step compiled and replayed as a CUDA graph on CUDA, the trainer's default) and packed training forward, fused
  linear loss. Rows split the time into rollout and update; the first (warm-up) step pays the compilation.
- trl / trl+liger: GRPOTrainer(use_vllm=False), without and with TRL's Liger loss; a row is "missing" when TRL
  (or Liger-Kernel) does not import. Step time from trainer callbacks; no rollout/update split there.

peak_mb is the absolute CUDA peak of the step (weights included: the number a consumer card must hold).
frac_floor = the step's physical floor / its median time (bench_engine.py's rule: prefill 2*P FLOPs per prompt
token and one read of the weights per decode step, then 6*P FLOPs per trained token).
`--quick` runs a tiny config on CPU (a smoke run; the numbers mean nothing). --headline (the device check): the
Qwen2.5-0.5B shape with 256 new tokens against TRL (not TRL+Liger), one timed step after the warm-up (which pays the
compilation of the decode step). Last stdout line: one JSON object.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from grpo_fast import train  # noqa: E402
from grpo_fast.config import Config  # noqa: E402

SUITE = "step"
SHAPES = common.QWEN25
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
FULL = dict(prompts=4, prompt_len=256, new=512, G=8, rank=16)
HEADLINE = dict(FULL, new=256)  # fits the device check's time budget (bench/device_check.sh)
QUICK = dict(prompts=2, prompt_len=16, new=8, G=4, rank=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokenizer(vocab_size: int):
    """Word-level tokenizer "t0".."t{V-1}" (no downloads): a prompt of n words is n tokens for both trainers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def build_model(shape: dict, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape, eos_token_id=1, pad_token_id=0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def random_reward(prompts, completions, completion_ids=None, **kwargs):
    return [random.random() for _ in completions]


def prompt_texts(s: dict, vocab: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"t{rng.randrange(2, vocab)}" for _ in range(s["prompt_len"])) for _ in range(s["prompts"])]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None


def ours(shape: dict, s: dict, device: torch.device, reps: int) -> dict:
    """Median rollout / update / step seconds of the trainer's step, and the CUDA peak."""
    cfg = dataclasses.replace(
        Config(), model="bench", lora_rank=s["rank"], lora_alpha=2 * s["rank"], group_size=s["G"],
        prompts_per_step=s["prompts"], micro_batch_groups=1, max_prompt_length=s["prompt_len"],
        max_new_tokens=s["new"], gradient_checkpointing=True, max_steps=reps + 1,
    )  # fmt: skip
    tok = tokenizer(shape["vocab_size"])
    from peft import LoraConfig, get_peft_model

    model = build_model(shape, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"], target_modules=TARGETS))
    optimizer, scheduler = train.make_optimizer(cfg, model)
    prompts = [torch.tensor(tok(p).input_ids, device=device) for p in prompt_texts(s, shape["vocab_size"])]
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(reps + 1):  # the first step warms up (compilation, allocator)
        reset_peak(device)
        t0 = time.perf_counter()
        roll = train.sample(model, prompts, cfg, tok, gen)
        common.sync(device)
        t1 = time.perf_counter()
        r = torch.tensor(random_reward(None, [None] * roll.completion_ids.shape[0]), device=device)
        mbs = train.micro_batches(roll, train.group_advantages(r, s["G"]), cfg)
        train.add_reference_logps(model, None, mbs, cfg)
        train.update(model, optimizer, scheduler, mbs, cfg)
        common.sync(device)
        if i:
            times.append((t1 - t0, time.perf_counter() - t1, float(roll.completion_mask.sum())))
    med = lambda k: statistics.median(t[k] for t in times)  # noqa: E731
    step_s = med(0) + med(1)
    return dict(median_ms=1e3 * step_s, rollout_ms=1e3 * med(0), update_ms=1e3 * med(1), tokens_per_s=med(2) / step_s)


class _StepTimer:
    """TrainerCallback-shaped: wall time of each optimizer step (generation happens inside the first micro-step)."""

    def __init__(self, device):
        self.device, self.times, self.peaks, self.t0 = device, [], [], 0.0

    def __getattr__(self, name):  # every other callback event is a no-op
        return lambda *a, **k: None

    def on_step_begin(self, *a, **k):
        reset_peak(self.device)
        self.t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
        common.sync(self.device)
        self.times.append(time.perf_counter() - self.t0)
        self.peaks.append(peak(self.device))


def trl_step(shape: dict, s: dict, device: torch.device, reps: int, liger: bool) -> dict:
    trl = common.import_peer("trl")
    if liger:
        common.import_peer("liger_kernel")
    from datasets import Dataset
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    extra = {k: True for k in ("use_liger_loss", "use_liger_kernel") if liger and k in names}
    if "max_prompt_length" in names:
        extra["max_prompt_length"] = s["prompt_len"]
    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(
            output_dir=out, report_to="none", save_strategy="no", logging_steps=1, max_steps=reps + 1,
            per_device_train_batch_size=s["G"], gradient_accumulation_steps=s["prompts"], num_generations=s["G"],
            max_completion_length=s["new"], use_vllm=False, beta=0.0, learning_rate=1e-5, gradient_checkpointing=True,
            bf16=device.type == "cuda", use_cpu=device.type == "cpu", temperature=1.0, **extra,
        )  # fmt: skip
        timer = _StepTimer(device)
        trainer = trl.GRPOTrainer(
            model=build_model(shape, device),
            reward_funcs=random_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompt_texts(s, shape["vocab_size"]) * (reps + 1)}),
            processing_class=tokenizer(shape["vocab_size"]),
            peft_config=LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"], target_modules=TARGETS),
            callbacks=[timer],
        )
        trainer.train()
    step_s = statistics.median(timer.times[1:])
    peaks = [p for p in timer.peaks[1:] if p is not None]
    return dict(median_ms=1e3 * step_s, peak_mb=max(peaks) if peaks else None)


def measured(case: str, provider: str, fn, device: torch.device, floor: float) -> dict:
    try:
        out = fn()
        frac = floor / (out["median_ms"] / 1e3)
        return common.stream(common.row(SUITE, case, "step", provider, **out, frac_floor=frac))
    except Exception as e:  # a failing or missing provider is a row, never a crash of the suite
        return common.stream(common.failed_row(SUITE, case, "step", provider, e))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def floor_s(shape: dict, s: dict, ceilings: dict, param_bytes: int) -> float:
    """The step's physical floor in seconds (module docstring), P the parameters (tied embeddings once)."""
    H, V, L, inter = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = H // shape["num_attention_heads"] * shape["num_key_value_heads"]
    P = V * H + L * (2 * H * H + 2 * H * kv + 3 * H * inter)  # embeddings (= head) + attention + MLP
    bytes_ = P * param_bytes
    flops = 2 * P * s["prompts"] * s["prompt_len"] + 6 * P * s["prompts"] * (s["prompt_len"] + s["G"] * s["new"])
    return flops / (ceilings["matmul_tflops"] * 1e12) + s["new"] * bytes_ / (ceilings["copy_gbps"] * 1e9)


def run(quick: bool, device: torch.device, ceilings: dict, select=common.EVERYTHING) -> list[dict]:
    s, reps = (QUICK, 1) if quick else (HEADLINE, 1) if select.headline else (FULL, 3)
    shapes = {"tiny": TINY} if quick else {k: v for k, v in SHAPES.items() if not select.headline or "0.5b" in k}
    rows = []
    for name, shape in shapes.items():
        case = f"{name} G={s['G']} prompts={s['prompts']}x{s['prompt_len']} new={s['new']} lora={s['rank']}"
        if select.case is not None and select.case not in case:
            continue
        floor = floor_s(shape, s, ceilings, 4 if device.type == "cpu" else 2)  # fp32 on CPU, bf16 on CUDA

        def ours_row(shape=shape):
            reset_peak(device)
            out = ours(shape, s, device, reps)
            return {**out, "peak_mb": peak(device)}

        rows.append(measured(case, "grpo_fast", ours_row, device, floor))
        for provider, liger in (("trl", False), ("trl+liger", True))[: 1 if select.headline else 2]:
            fn = lambda shape=shape, liger=liger: trl_step(shape, s, device, reps, liger)  # noqa: E731
            rows.append(measured(case, provider, fn, device, floor))
    return rows


if __name__ == "__main__":
    common.main(SUITE, run)
