"""Held-out evaluation in the training loop (heldout.py): eval_* fields at step 0, every eval_steps and after the
last step, equal to the model's own greedy `generate` scored by the run's reward; training unchanged by it; the
eval set's defaults and sources; the closing summary line. Resume and interruptions: test_train_run.py,
test_interrupt.py; bad values: test_train_cli.py."""

import dataclasses
import json

import pytest
import torch
from test_train_run import comparable, tiny_cfg
from transformers import LlamaForCausalLM

from grpo_fast import evaluate, heldout, run_log, tiny, train
from grpo_fast.config import Config

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")

EVAL_KEYS = {
    "eval_pass_rate", "eval_reward", "eval_reward_reverse_mean", "eval_prompts", "eval_completion_length_mean",
    "eval_clipped_ratio",
}  # fmt: skip


def own_greedy_eval(model, tok, rows: list[dict], max_new_tokens: int) -> dict:
    """Pass rate and mean reward of the model's own greedy `generate`, one prompt at a time, scored by the reverse
    reward (binary pass: every letter right)."""
    scores = []
    for row in rows:
        x = torch.tensor([tok(row["prompt"]).input_ids])
        out = model.generate(
            x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, x.shape[1] :]  # fmt: skip
        text = tok.decode(out, skip_special_tokens=True)
        scores.append(tiny.reverse_reward([row["prompt"]], [text], answer=[row["answer"]])[0])
    return {"eval_pass_rate": sum(s == 1.0 for s in scores) / len(scores), "eval_reward": sum(scores) / len(scores)}


def test_evaluations_at_step_0_every_k_steps_and_the_end_equal_the_models_own_generate(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, max_steps=5, eval_steps=2, eval_prompts=20, learning_rate=3e-3)
    rows = train.run(cfg)
    out = tmp_path / "run"
    logged = run_log.read_jsonl(out / "metrics.jsonl")
    assert logged == json.loads(json.dumps(rows))
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in logged if "eval_reward" in r] == [0, 2, 4, 5]
    assert set(logged[0]) == {"step"} | EVAL_KEYS  # the policy before training: a row of its own
    evals = [logged[i] for i in (0, 2, 4, 5)]
    assert all(EVAL_KEYS <= set(r) and "reward" in r for r in evals[1:])
    assert all(not EVAL_KEYS & set(logged[i]) for i in (1, 3))
    assert all(r["eval_prompts"] == 20 and r["eval_reward"] == r["eval_reward_reverse_mean"] for r in evals)

    tok, held = tiny.build_tokenizer(), tiny.reverse_task(split="test")[:20]  # the default: the task's own held out
    before = tiny.build_model(tok, cfg.seed).eval()  # the policy of step 0
    after = LlamaForCausalLM.from_pretrained(out / "final").eval()  # the policy of step 5
    for row, model in ((logged[0], before), (logged[-1], after)):
        want = own_greedy_eval(model, tok, held, cfg.max_new_tokens)
        assert row["eval_pass_rate"] == pytest.approx(want["eval_pass_rate"])
        assert row["eval_reward"] == pytest.approx(want["eval_reward"])
    assert logged[0]["eval_reward"] != logged[-1]["eval_reward"]  # the policy moved: the evaluations tell apart
    err = capsys.readouterr().err
    assert "eval after step 2: greedy completions of 20 held-out prompts" in err
    first, last = logged[0], logged[-1]
    assert (
        f"held-out (20 prompts, greedy): pass rate {first['eval_pass_rate']:.3f}, mean reward "
        f"{first['eval_reward']:.3f} after step 0 -> pass rate {last['eval_pass_rate']:.3f}, mean reward "
        f"{last['eval_reward']:.3f} after step 5"
    ) in err


def test_training_is_the_same_with_or_without_evaluation(tmp_path):
    plain = train.run(tiny_cfg(tmp_path / "a", max_steps=3, eval_prompts=0))
    evaluated = train.run(tiny_cfg(tmp_path / "b", max_steps=3, eval_steps=1))
    assert [r["step"] for r in plain] == [1, 2, 3] and [r["step"] for r in evaluated] == [0, 1, 2, 3]
    training = [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in evaluated[1:]]
    assert comparable(training) == comparable(plain)
    weights = [LlamaForCausalLM.from_pretrained(tmp_path / d / "run" / "final").state_dict() for d in "ab"]
    assert all(torch.equal(weights[0][k], v) for k, v in weights[1].items())


def test_a_local_eval_file_smaller_than_asked(tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.reverse_task(split="test")[:5]))
    cfg = tiny_cfg(tmp_path, max_steps=1, eval_dataset=str(data), eval_prompts=8)
    rows = train.run(cfg)
    assert [r["eval_prompts"] for r in rows] == [5, 5]
    assert "eval_dataset" in capsys.readouterr().err  # says it scores the 5 it has


def test_the_eval_set_by_default_and_by_name(tmp_path):
    base = Config(dataset="arithmetic", rewards=["arithmetic"])
    assert heldout.source(base) == ("arithmetic", "test")
    assert heldout.source(dataclasses.replace(base, dataset="gsm8k")) == ("gsm8k", "test")
    assert heldout.source(dataclasses.replace(base, dataset_split="test")) is None  # it trains on the held out
    assert heldout.source(dataclasses.replace(base, eval_prompts=0)) is None
    assert heldout.source(dataclasses.replace(base, dataset=str(tmp_path / "train.jsonl"))) is None  # no default
    assert heldout.source(dataclasses.replace(base, eval_dataset="countdown")) == ("countdown", "test")
    held = str(tmp_path / "held.jsonl")
    assert heldout.source(dataclasses.replace(base, eval_dataset=held)) == (held, "train")  # a file: whole


def test_the_plot_shows_evaluations_without_training_rows(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    run_log.append_jsonl(metrics, {"step": 0, "eval_reward": 0.5, "eval_pass_rate": 0.25, "eval_prompts": 4})
    run_log.plot_rewards(metrics, tmp_path / "curve.png")  # a run stopped after its step-0 evaluation
    assert (tmp_path / "curve.png").stat().st_size > 1000


@pytest.mark.parametrize(("flag", "want"), [("auto", None), ("off", False)])
def test_evaluation_decodes_as_the_rollouts_do(tmp_path, monkeypatch, flag, want):
    """--compile-decode reaches the evaluation's generate_groups calls (greedy: no log-probs, no generator)."""
    calls, real = [], evaluate.generate_groups
    monkeypatch.setattr(evaluate, "generate_groups", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    train.run(tiny_cfg(tmp_path, max_steps=1, eval_prompts=4, compile_decode=flag))
    assert len(calls) == 2  # step 0 and after step 1, 4 prompts in one call each
    assert all(kw["compile_decode"] is want and kw["temperature"] == 0.0 and "generator" not in kw for kw in calls)
