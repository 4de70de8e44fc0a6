"""Issue 13, the trainer's behaviour where hostile input is valid but used to mislead: the answer column the user
named, rewards that score nothing, resumes that change the schedule or meet torn files, a diverging policy, a
reward so large that its mean overflows. Runs go through `train.main(argv)` (as the CLI) on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast import accumulation, checkpoint, dataset_rows, rewards, run_log, schedule, tiny, train
from grpo_fast.config import PRESETS, Config

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")

BASE = ["--no-progress", "--prompts-per-step", "2", "--group-size", "2"]
TIMINGS = {"tokens_per_s", "rollout_s", "update_s", "peak_mem_mb"}
WORDS = [a + b + c for a in "abcd" for b in "abcd" for c in "ab"]


def cli(out, capsys, *args) -> tuple[int, str]:
    rc = train.main([*BASE, "--output-dir", str(out), *map(str, args)])
    return rc, capsys.readouterr().err


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_d2_the_named_answer_column_is_the_one_rewards_score(tmp_path, capsys, monkeypatch):
    """D2: with both `answer` and `solution` columns, --answer-column solution reaches the rewards as `answer`."""
    rows = [{"prompt": w + "=", "solution": w[::-1], "answer": "zzz"} for w in WORDS]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module(tmp_path, monkeypatch, "seen", f"""
import json
def record(prompts, completions, completion_ids, *, answer, solution, **kw):
    with open({str(tmp_path / "seen.jsonl")!r}, "a") as f:
        f.write(json.dumps({{"answer": answer, "solution": solution}}) + "\\n")
    return [0.0] * len(completions)
""")  # fmt: skip
    rc, err = cli(tmp_path / "run", capsys, "--max-steps", 2, "--dataset", tmp_path / "d.jsonl",
                  "--answer-column", "solution", "--rewards", "seen:record", "reverse")  # fmt: skip
    assert rc == 0, err
    assert "the rewards receive column 'solution' as `answer`" in err
    seen = run_log.read_jsonl(tmp_path / "seen.jsonl")
    assert len(seen) == 3 and all(s["answer"] == s["solution"] and "zzz" not in s["answer"] for s in seen)
    columns = rewards.columns(rows[:2], "prompt", "solution")
    assert columns["answer"] == columns["solution"] == [r["solution"] for r in rows[:2]]


def test_d8_a_reward_that_scores_nothing_is_reported(tmp_path, capsys, monkeypatch):
    module(tmp_path, monkeypatch, "nothing", "def none(prompts, completions, completion_ids, **kw):\n"
                                             "    return [None] * len(completions)\n")  # fmt: skip
    rc, err = cli(tmp_path / "run", capsys, "--max-steps", 2, "--rewards", "reverse", "nothing:none")
    assert rc == 0, err
    assert "warning: step 1: reward 'nothing:none' scored no sample" in err
    assert "warning: step 2: reward 'nothing:none' scored no sample" in err
    assert "'reverse' scored" not in err


def test_d8_math_answers_without_a_number(capsys):
    cfg = Config(rewards=["math"])
    rows = [{"prompt": "p", "answer": a} for a in ("#### 12", "seven", "3.5")]
    dataset_rows.check_answers(rows, cfg)
    assert "warning: 1 of 3 rows have no number in 'answer' (first: row 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"the math reward finds no number in column 'answer' \(row 0: 'seven'\)"):
        dataset_rows.check_answers([{"prompt": "p", "answer": "seven"}], cfg)


def test_d9_max_steps_may_grow_without_an_update_at_lr_0(tmp_path, capsys):
    """The schedule is laid over the new total: the first resumed update gets the new schedule's LR, not 0."""
    out = tmp_path / "run"
    assert cli(out, capsys, "--max-steps", 2)[0] == 0
    assert run_log.read_jsonl(out / "metrics.jsonl")[-1]["lr"] > 0
    rc, err = cli(out, capsys, "--max-steps", 4, "--resume")
    assert rc == 0, err
    assert "resume: max_steps: 2 -> 4" in err
    rows = run_log.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # step 0: the held-out evaluation before training
    rows = rows[1:]
    cfg = Config(**{**PRESETS["tiny"], "max_steps": 4})
    opt, sched = schedule.make_optimizer(cfg, tiny.build_model(tiny.build_tokenizer()))
    want = []
    for _ in range(4):
        want.append(sched.get_last_lr()[0])
        opt.step(), sched.step()
    assert [r["lr"] for r in rows[2:]] == pytest.approx(want[2:], rel=1e-12)  # the 4-step schedule's updates 3, 4
    assert all(r["lr"] > 0 for r in rows)
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4  # the value in effect


def corrupt(path, mode: str) -> None:
    if mode == "trainer.pt":
        blob = (path / "trainer.pt").read_bytes()
        (path / "trainer.pt").write_bytes(blob[:1000])
    elif mode == "weights":
        (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:500])
    else:
        (path / "trainer_state.json").write_text('{"step": 2, "data_pos')


@pytest.mark.parametrize("mode", ["trainer.pt", "weights", "trainer_state.json"])
def test_d12_a_torn_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, mode):
    """A checkpoint torn by a crash or a full disk: the previous one is used, saying so, and the run is exact."""
    want = tmp_path / "want"
    assert cli(want, capsys, "--max-steps", 3, "--save-steps", 1)[0] == 0
    out = tmp_path / "run"
    assert cli(out, capsys, "--max-steps", 2, "--save-steps", 1)[0] == 0
    corrupt(out / "checkpoints" / "checkpoint-0000002", mode)
    rc, err = cli(out, capsys, "--max-steps", 3, "--save-steps", 1, "--resume")
    assert rc == 0, err
    assert f"checkpoint-0000002: {mode if mode != 'weights' else 'model.safetensors'} cannot be read" in err
    assert "checkpoint-0000001" in err and "resumed from" in err
    got, ref = (run_log.read_jsonl(p / "metrics.jsonl") for p in (out, want))
    assert comparable(got) == comparable(ref)


def interrupted_run(out, capsys, monkeypatch, at_step: int, *args) -> None:
    """A run killed (KeyboardInterrupt from inside) when step `at_step` starts: the steps before it are done."""
    real = train.train_step

    def dies(step, *a):
        if step + 1 == at_step:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train.main([*BASE, "--output-dir", str(out), *map(str, args)])
    monkeypatch.setattr(train, "train_step", real)
    capsys.readouterr()


def test_d13_d14_torn_logs_are_tolerated_and_samples_truncated_on_resume(tmp_path, capsys, monkeypatch):
    args = ("--max-steps", 4, "--save-steps", 2, "--log-samples-steps", 1)
    assert cli(tmp_path / "want", capsys, *args)[0] == 0
    out = tmp_path / "run"
    interrupted_run(out, capsys, monkeypatch, 4, *args)  # steps 1-3 logged, checkpoint at 2
    for log in run_log.LOGS:
        with open(out / log, "a") as f:
            f.write('{"step": 4, "rew')  # a torn last line: power loss, a full disk
    rc, err = cli(out, capsys, *args, "--resume")
    assert rc == 0, err
    assert "metrics.jsonl: dropping a torn last line" in err and "samples.jsonl: dropping a torn last line" in err
    for log, first in zip(run_log.LOGS, (0, 1)):  # metrics.jsonl: step 0 is the held-out evaluation before training
        got, want = (run_log.read_jsonl(p / log) for p in (out, tmp_path / "want"))
        assert [r["step"] for r in got] == list(range(first, 5))  # each step once (D14: samples were not truncated)
        assert comparable(got) == comparable(want)


def test_a_torn_line_inside_a_log_names_the_file_and_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2, "re\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl: line 2 is not JSON"):
        run_log.read_jsonl(tmp_path / "m.jsonl")


def test_d16_diverged_weights_stop_with_the_step_and_write_no_broken_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:  # the second update blows up the weights
            self.param_groups[0]["params"][0].data.fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    rc, err = cli(out, capsys, "--max-steps", 3, "--save-steps", 1)
    assert rc == 2 and "Traceback" not in err
    assert f"training diverged at step 2: non-finite weights after the update; last checkpoint (finite): {out}" in err
    assert [p.name for p in checkpoint.all_checkpoints(out / "checkpoints")] == ["checkpoint-0000001"]
    assert not (out / "final").exists() and [r["step"] for r in run_log.read_jsonl(out / "metrics.jsonl")] == [0, 1]
    weights = load_file(out / "checkpoints" / "checkpoint-0000001" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_d16_diverged_logits_in_the_rollout(tmp_path, capsys):
    """A learning rate of 1e30: finite weights after the first applied update, infinite logits in the next rollout
    (step 2, or later when the first steps' groups all had equal rewards: no gradient, no update)."""
    rc, err = cli(tmp_path / "run", capsys, "--max-steps", 4, "--save-steps", 1, "--learning-rate", "1e30")
    assert rc == 2 and "Traceback" not in err
    rows = run_log.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    step = 1 + next(r["step"] for r in rows if r.get("grad_norm", 0) > 0)  # step 0's row: the evaluation alone
    assert f"diverged at step {step}: generate_groups: the model's next-token logits are NaN or infinite" in err, err
    assert f"checkpoint-{step - 1:07d}" in err  # the last good checkpoint is named


def test_d17_an_overflowing_reward_mean_is_logged_as_null_and_the_run_completes(tmp_path, capsys, monkeypatch):
    module(tmp_path, monkeypatch, "huge", "def half(prompts, completions, completion_ids, **kw):\n"
                                          "    return [1e38 * (i % 2) for i in range(len(completions))]\n")  # fmt: skip
    out = tmp_path / "run"
    rc, err = cli(out, capsys, "--max-steps", 2, "--prompts-per-step", 4, "--rewards", "huge:half", "--plot-steps", 1)
    assert rc == 0, err
    assert [r["reward"] for r in run_log.read_jsonl(out / "metrics.jsonl") if r["step"]] == [None, None]
    assert checkpoint.latest(out / "checkpoints").name == "checkpoint-0000002" and (out / "final").is_dir()


def test_d22_resume_without_a_checkpoint_says_so_and_starts_at_step_0(tmp_path, capsys):
    out = tmp_path / "never_existed"
    rc, err = cli(out, capsys, "--max-steps", 1, "--resume")
    assert rc == 0, err
    assert f"resume: no checkpoint under {out / 'checkpoints'}: starting at step 0" in err
    assert [r["step"] for r in run_log.read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_d11_a_local_csv_trains(tmp_path, capsys):
    (tmp_path / "d.CSV").write_text("prompt,answer\n" + "".join(f"{w}=,{w[::-1]}\n" for w in WORDS))
    rc, err = cli(tmp_path / "run", capsys, "--max-steps", 1, "--dataset", tmp_path / "d.CSV")
    assert rc == 0, err


def test_a_nan_loss_is_reported_and_not_applied(tmp_path, capsys, monkeypatch):
    """Active NaN (here in the hidden states, as from an overflow) makes the loss NaN on the trainer's path: the
    step is reported and skipped, the weights untouched."""
    real = accumulation.hidden

    def poisoned(model, mb, cfg):
        h = real(model, mb, cfg).clone()
        h[0, 0, 0] = math.nan  # the first completion token is always active
        return h

    monkeypatch.setattr(accumulation, "hidden", poisoned)
    out = tmp_path / "run"
    rc, err = cli(out, capsys, "--max-steps", 2)
    assert rc == 0, err
    assert "non-finite loss (nan)" in err and "update not applied" in err
    assert [r.get("skipped") for r in run_log.read_jsonl(out / "metrics.jsonl")] == [None, 1, 1]  # None: step 0
    final = load_file(out / "final" / "model.safetensors")
    initial = tiny.build_model(tiny.build_tokenizer(), 0).state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in final)
