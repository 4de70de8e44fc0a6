"""GGUF files as --model: a tiny Llama GGUF written here loads exactly (against the fp32 model the file holds),
trains with LoRA and in full, checkpoints, resumes, and leaves a final/ that transformers and peft load back;
the same on the real SmolLM2-135M-Instruct GGUF (slow)."""

import dataclasses
import json

import pytest
import torch
from gguf_files import write_tiny_llama
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_fast import checkpoint, data, gguf_models, policy, rewards, run_log, train
from grpo_fast.config import Config

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")


def gguf_cfg(path, out, **kw) -> Config:
    task = dict(dataset="arithmetic", rewards=["arithmetic"], task_size=16, task_heldout=4, arithmetic_digits=1)
    sizes = dict(group_size=2, prompts_per_step=2, micro_batch_groups=2, max_prompt_length=96, max_new_tokens=4)
    run = dict(max_steps=2, save_steps=1, learning_rate=1e-3, lora_rank=4, output_dir=str(out), progress=False)
    return Config(model=str(path), **(task | sizes | run | kw))


def load_back(path, final):
    """final/ as a user loads it: the full model by transformers, or the GGUF base plus the adapter by peft."""
    if (final / "adapter_config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return PeftModel.from_pretrained(base, final).eval()
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()


def interrupted_then_resumed(cfg: Config, monkeypatch) -> tuple[list[dict], dict]:
    """Runs `cfg` (2 steps, a checkpoint each), kills it after step 1, resumes it; returns the resumed run's
    metrics rows and the policy it saved as final/ ({"model", "state": a copy of its weights})."""
    real_step, real_save, trained = train.train_step, train.save_final, {}

    def dies_at_step_2(step, *args):
        if step == 1:  # step 1 done and checkpointed
            raise KeyboardInterrupt
        return real_step(step, *args)

    def save_final(model, tokenizer, out):
        trained.update(model=model, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_save(model, tokenizer, out)

    monkeypatch.setattr(train, "train_step", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.setattr(train, "train_step", real_step)
    monkeypatch.setattr(train, "save_final", save_final)
    return train.run(dataclasses.replace(cfg, resume=True)), trained


def assert_final_is(trained: dict, back, x: torch.Tensor, atol: float) -> None:
    """The loaded-back final/ holds the trained policy: the same weights, the same logits on `x`."""
    loaded = back.state_dict()
    assert set(loaded) == set(trained["state"])
    assert all(torch.equal(loaded[k], v) for k, v in trained["state"].items())
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, trained["model"](x).logits, rtol=0, atol=atol)


def test_tiny_gguf_loads_as_the_dense_model_the_file_holds(tmp_path):
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_llama(path)
    tok = policy.load_tokenizer(str(path))
    ids = policy.encode_prompt(tok, "What is 2 + 3?", None, 96)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")  # the chat template from the file
    model, _ = policy.load_policy(Config(model=str(path), lora=False), tok, torch.device("cpu"))
    assert model.dtype == torch.float32 and all(p.requires_grad for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)  # q/k rows un-permuted, Q8_0 dequantized exactly
    where, kwargs = gguf_models.model_args(str(path))  # the GPU's training dtype, bf16
    half = gguf_models.make_trainable(AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16, **kwargs), path)
    assert all(torch.equal(v, reference.state_dict()[k].bfloat16()) for k, v in half.state_dict().items())


def test_gguf_model_marked_quantized_is_unmarked_and_saves(tmp_path):
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_llama(path)
    marked = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert marked.hf_quantizer is not None  # dense, but transformers refuses to save it as it is
    gguf_models.make_trainable(marked, path).save_pretrained(tmp_path / "saved")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("lora", [True, False])
def test_tiny_gguf_trains_resumes_and_final_loads_back(tmp_path, monkeypatch, lora):
    path, out = tmp_path / "tiny.gguf", tmp_path / "run"
    write_tiny_llama(path)
    resumed, trained = interrupted_then_resumed(gguf_cfg(path, out, lora=lora), monkeypatch)
    assert [r["step"] for r in resumed] == [2]
    rows = run_log.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the held-out evaluation (the task's 4 held-out sums)
    assert [r["step"] for r in rows if "eval_pass_rate" in r] == [0, 2] and rows[-1]["eval_prompts"] == 4
    assert checkpoint.latest(out / "checkpoints").name == "checkpoint-0000002"
    final = out / "final"
    if lora:
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(path.resolve())  # the GGUF base it was trained on
    else:
        assert "quantization_config" not in json.loads((final / "config.json").read_text())
    x = torch.tensor([policy.encode_prompt(AutoTokenizer.from_pretrained(final), "What is 4 + 4?", None, 96)])
    assert_final_is(trained, load_back(path, final), x, atol=1e-5)


def test_gguf_errors_name_the_model(tmp_path):
    with pytest.raises(ValueError, match="no such GGUF file"):
        policy.load_tokenizer(str(tmp_path / "missing.gguf"))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    with pytest.raises(ValueError, match="load_in_4bit cannot be combined with a GGUF model"):
        policy.load_policy(Config(model=str(path), load_in_4bit=True), None, torch.device("cpu"))
    assert gguf_models.is_gguf("x/Model.Q4_K_M.GGUF") and not gguf_models.is_gguf("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.slow
def test_smollm2_gguf_lora_trains_checkpoints_resumes_and_reloads(smollm2_gguf, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = gguf_cfg(smollm2_gguf, out, max_new_tokens=8, learning_rate=1e-4, lora_rank=8)
    resumed, trained = interrupted_then_resumed(cfg, monkeypatch)
    rows = run_log.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["skipped"] == 0 for r in rows[1:])
    base = trained["model"].get_base_model()
    assert base.dtype == torch.float32 and base.config.num_hidden_layers == 30  # SmolLM2-135M, dequantized
    back, tok = load_back(smollm2_gguf, out / "final"), AutoTokenizer.from_pretrained(out / "final")
    x = torch.tensor([policy.encode_prompt(tok, "What is 2 + 2? Answer with just the final number.", None, 96)])
    assert_final_is(trained, back, x, atol=1e-4)
    with torch.no_grad():
        answer = back.generate(x, max_new_tokens=8, do_sample=False)[0, x.shape[1] :]
    assert "4" in tok.decode(answer, skip_special_tokens=True)  # the instruct model still answers
    # the last held-out evaluation (through the engine, in the run) equals the reloaded policy's own greedy generate
    held = data.load("arithmetic", None, "test", "prompt", "answer", cfg)
    scores = []
    for row in held:
        x = torch.tensor([policy.encode_prompt(tok, row["prompt"], None, cfg.max_prompt_length)])
        with torch.no_grad():
            ids = back.generate(x, max_new_tokens=cfg.max_new_tokens, do_sample=False)[0, x.shape[1] :]
        scores += rewards.math_reward(None, [tok.decode(ids, skip_special_tokens=True)], answer=[row["answer"]])
    assert rows[-1]["eval_prompts"] == len(held) == 4
    assert rows[-1]["eval_pass_rate"] == pytest.approx(sum(scores) / len(scores))
