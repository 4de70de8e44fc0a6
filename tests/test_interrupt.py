"""Issue 13, interruptions: SIGINT (Ctrl-C) and SIGTERM (preemption) stop the run at a step boundary with a
checkpoint of the last completed step, the exit status 130 / 143 and the command that resumes; a second signal
exits at once. A run interrupted by SIGINT, resumed with the printed command, interrupted again by SIGTERM and
resumed to the end equals the uninterrupted run: metrics rows and final weights.

The signals are real: a reward function sends them to its own process (`killer.py`) at a chosen call, so the step
where they land is deterministic. With held-out evaluations every 2 steps the calls of a fresh run are: 1 the dry run
of the training rows, 2 that of the held-out rows, 3 the evaluation of step 0, then steps 1, 2, evaluation 2, 3, 4, ...
(a resumed run: the two dry runs, then its steps and evaluations).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast import checkpoint, run_log, train

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")

KILLER = """
import os, signal
from grpo_fast.tiny import reverse_reward
calls = [0]
def reverse(prompts, completions, completion_ids, *, answer, **kw):
    calls[0] += 1
    if calls[0] == int(os.environ.get("KILL_AT_CALL", "0")):
        for _ in range(int(os.environ.get("KILL_TIMES", "1"))):
            os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))
    return reverse_reward(prompts, completions, completion_ids, answer=answer)
reverse.max_reward = 1.0
"""
TIMINGS = {"tokens_per_s", "rollout_s", "update_s", "peak_mem_mb"}


def argv(out) -> list[str]:
    return ["--no-progress", "--max-steps", "6", "--save-steps", "4", "--prompts-per-step", "2", "--group-size", "2",
            "--log-samples-steps", "1", "--rewards", "killer:reverse", "--eval-steps", "2",
            "--output-dir", str(out)]  # fmt: skip


@pytest.fixture
def killer(tmp_path, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "killer", raising=False)  # a fresh call counter per test
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def subprocess_run(cmd: list[str], cwd, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env, cwd=cwd)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


@pytest.mark.slow
def test_sigint_then_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, capsys, killer, monkeypatch):
    want, out = tmp_path / "want", tmp_path / "run"
    monkeypatch.delenv("KILL_AT_CALL", raising=False)
    assert train.main(argv(want)) == 0

    cmd = [sys.executable, "-m", "grpo_fast.train", *argv(out)]
    first = subprocess_run(cmd, tmp_path, KILL_AT_CALL="5", KILL_SIGNAL="SIGINT")  # lands in step 2
    assert first.returncode == 130, first.stderr
    assert "SIGINT received: stopping after the step under way" in first.stderr
    assert f"stopped after step 2; checkpoint: {out / 'checkpoints' / 'checkpoint-0000002'}" in first.stderr
    assert "Traceback" not in first.stderr
    resume = re.search(r"resume with: (.*)", first.stderr).group(1)
    assert resume.endswith("--resume") and shlex.split(resume)[1:] == ["-m", "grpo_fast.train", *argv(out), "--resume"]

    second = subprocess_run(shlex.split(resume), tmp_path, KILL_AT_CALL="6", KILL_SIGNAL="SIGTERM")  # step 5
    assert second.returncode == 143, second.stderr
    assert f"stopped after step 5; checkpoint: {out / 'checkpoints' / 'checkpoint-0000005'}" in second.stderr
    assert [p.name for p in checkpoint.all_checkpoints(out / "checkpoints")] == ["checkpoint-0000004",
                                                                                 "checkpoint-0000005"]  # fmt: skip

    assert train.main([*argv(out), "--resume"]) == 0
    for log, steps in zip(run_log.LOGS, ([0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])):
        got, ref = (run_log.read_jsonl(p / log) for p in (out, want))
        assert [r["step"] for r in got] == steps
        assert comparable(got) == comparable(ref), log
    evals = [r for r in run_log.read_jsonl(out / "metrics.jsonl") if "eval_pass_rate" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]  # each held-out evaluation once, across three processes
    final, ref = (load_file(p / "final" / "model.safetensors") for p in (out, want))
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)


def test_a_second_signal_exits_at_once(tmp_path, capsys, killer, monkeypatch):
    """Two SIGINTs in step 2: no checkpoint of step 2 (the one of step 1 stays), exit 130, the resume command."""
    out = tmp_path / "run"
    monkeypatch.setenv("KILL_AT_CALL", "5")
    monkeypatch.setenv("KILL_SIGNAL", "SIGINT")
    monkeypatch.setenv("KILL_TIMES", "2")
    rc = train.main([*argv(out), "--save-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "SIGINT again: exiting at once" in err and "resume with: " in err and "Traceback" not in err
    assert checkpoint.latest(out / "checkpoints").name == "checkpoint-0000001"
    assert [r["step"] for r in run_log.read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_interrupt_before_the_first_step_saves_nothing(tmp_path, capsys, killer, monkeypatch):
    """A signal during setup (the reward dry run): the run stops before step 1 with nothing to save."""
    monkeypatch.setenv("KILL_AT_CALL", "1")
    monkeypatch.setenv("KILL_SIGNAL", "SIGTERM")
    rc = train.main(argv(tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc == 143, err
    assert "stopped after step 0; checkpoint: none (no step completed)" in err


def test_the_handlers_are_restored_after_a_run(tmp_path, capsys, killer, monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("KILL_AT_CALL", raising=False)
    assert train.main([*argv(tmp_path / "run"), "--max-steps", "1"]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
