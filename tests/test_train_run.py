"""End-to-end trainer runs on CPU: the embedded default, a tiny Llama loaded by path with LoRA on a local
JSONL dataset, resume equivalence, and a crash while checkpointing."""

import dataclasses
import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from grpo_fast import checkpoint, run_log, tiny, train
from grpo_fast.config import PRESETS, Config

METRIC_KEYS = {  # issue 5: every field of a metrics.jsonl row
    "step", "reward", "reward_std", "frac_reward_zero_std", "completion_length_mean", "completion_length_max",
    "clipped_ratio", "loss", "kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
    "grad_norm", "lr", "tokens_per_s", "rollout_s", "update_s", "peak_mem_mb",
}  # fmt: skip
TIMINGS = {"tokens_per_s", "rollout_s", "update_s", "peak_mem_mb"}


pytestmark = pytest.mark.usefixtures("trainer_cpu_path")


def tiny_cfg(tmp_path, **kw) -> Config:
    small = dict(prompts_per_step=4, micro_batch_groups=2, group_size=4, max_steps=3, save_steps=0, cpu_threads=0)
    small["eval_prompts"] = 8  # the held-out evaluations at step 0 and the end, on fewer prompts (CPU time)
    return dataclasses.replace(
        Config(**PRESETS["tiny"]), output_dir=str(tmp_path / "run"), progress=False, **(small | kw)
    )


def test_embedded_default_runs(tmp_path):
    rows = train.run(tiny_cfg(tmp_path, max_steps=3))
    out = tmp_path / "run"
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the held-out evaluation before training
    assert [r["step"] for r in rows if "eval_pass_rate" in r] == [0, 3]  # and after the last step (test_heldout.py)
    assert run_log.read_jsonl(out / "metrics.jsonl") == json.loads(json.dumps(rows))
    rows = rows[1:]
    assert METRIC_KEYS | {"reward_reverse_mean", "reward_reverse_std"} <= set(rows[0])
    assert all(0.0 <= r["reward"] <= 1.0 and r["grad_norm"] > 0 for r in rows)
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    assert run_log.read_jsonl(out / "samples.jsonl")[0]["samples"]
    assert checkpoint.latest(out / "checkpoints").name == "checkpoint-0000003"  # always saved at the end


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = "0123456789+=? abcdefghijklmnopqrstuvwxyz<>/"
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast


def test_local_llama_lora_jsonl_math(tmp_path):
    model_dir, data = tmp_path / "llama", tmp_path / "train.jsonl"
    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data.write_text(
        "".join(json.dumps({"question": f"{a}+{b}=?", "sol": str(a + b)}) + "\n" for a in range(5) for b in range(3))
    )
    cfg = Config(
        model=str(model_dir), dataset=str(data), prompt_column="question", answer_column="sol",
        rewards=["math", "length"], reward_weights=[1.0, 0.1], group_size=4, prompts_per_step=2, micro_batch_groups=1,
        max_prompt_length=8, max_new_tokens=4, max_steps=2, save_steps=1, beta=0.04, num_iterations=2, lora_rank=4,
        learning_rate=1e-3, output_dir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    rows = train.run(cfg)
    keys = METRIC_KEYS | {f"reward_{n}_{s}" for n in ("math", "length") for s in ("mean", "std")}
    assert all(keys <= set(r) for r in rows) and len(rows) == 2
    assert all(r["kl"] >= 0 and r["skipped"] == 0 for r in rows)
    from peft import PeftModel

    final = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "run" / "final")
    lora = {n: p for n, p in final.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # trained adapters, loaded in peft format


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def test_resume_gives_the_same_metrics(tmp_path, monkeypatch):
    """Held-out evaluations included (step 0, every 2 steps): each once, equal to the uninterrupted run's."""
    full = train.run(tiny_cfg(tmp_path / "a", max_steps=4, save_steps=2, eval_steps=2))
    cfg = tiny_cfg(tmp_path / "b", max_steps=4, save_steps=2, eval_steps=2)
    real_step = train.train_step

    def stop_at_3(step, *args):
        if step == 2:  # steps 1-2 done and checkpointed: the process dies here
            raise KeyboardInterrupt
        return real_step(step, *args)

    monkeypatch.setattr(train, "train_step", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.setattr(train, "train_step", real_step)
    with pytest.raises(ValueError, match="--resume"):
        train.run(cfg)  # a fresh run would clobber the checkpoints
    resumed = train.run(dataclasses.replace(cfg, resume=True))
    assert [r["step"] for r in resumed] == [3, 4]
    stitched = run_log.read_jsonl(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in stitched] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in stitched if "eval_reward" in r] == [0, 2, 4]
    assert comparable(stitched) == comparable(json.loads(json.dumps(full)))


@pytest.mark.parametrize(
    "error, message",
    [(OSError("disk full (simulated mid-write)"), r"disk full \(simulated mid-write\)"),
     # what torch.save's zip writer raises on a full disk (issue 13, D10)
     (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 615296 vs 615188"),
      r"\[enforce fail at inline_container.cc:672\] . unexpected pos 615296 vs 615188")],
    ids=["oserror", "torch-zip-writer"],
)  # fmt: skip
def test_crash_while_checkpointing_keeps_previous(tmp_path, monkeypatch, error, message):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_steps=2)
    real_save, calls = torch.save, []

    def dies_on_second_checkpoint(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise error
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", dies_on_second_checkpoint)
    line = r"cannot write checkpoint .*tmp-checkpoint-0000004: " + message + r" \(\d+ MB free there\); the previous"
    with pytest.raises(ValueError, match=line):
        train.run(cfg)  # one line naming the path (main prints it as `error: ...`)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoint.all_checkpoints(ckpts)] == ["checkpoint-0000002"]
    assert (ckpts / ".tmp-checkpoint-0000004").is_dir()  # the half-written one never got its final name
    resumed = train.run(dataclasses.replace(cfg, resume=True))  # the previous checkpoint loads and training goes on
    assert [r["step"] for r in resumed] == [3, 4]
    assert checkpoint.latest(ckpts).name == "checkpoint-0000004"


def test_non_finite_gradient_is_reported_and_not_applied(tmp_path, monkeypatch, capsys):
    real = train.accumulate

    def poisoned(model, mbs, cfg):
        loss, metrics = real(model, mbs, cfg)
        next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return loss, metrics

    monkeypatch.setattr(train, "accumulate", poisoned)
    cfg = tiny_cfg(tmp_path, max_steps=2)
    rows = train.run(cfg)
    assert [r.get("skipped") for r in rows] == [None, 1, 1]  # step 0: the held-out evaluation
    assert "update not applied" in capsys.readouterr().err
    final = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    initial = tiny.build_model(tiny.build_tokenizer(), cfg.seed).state_dict()
    assert all(torch.equal(final[k], v) for k, v in initial.items())  # weights untouched
