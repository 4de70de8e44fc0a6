"""Data-parallel training under torchrun on CPU (gloo): 2 ranks hold identical parameters and equal one process
over the same global batch (ddp, and fsdp2 through a torch.distributed.checkpoint resume); bad launches fail
before training with a clear message.

The single-process run samples with `rollout_groups` = one rank's share, so every prompt's completions are drawn
from the same seeded stream as under 2 ranks (train.sample); everything else must then agree within fp tolerance.
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast import checkpoint, run_log, train
from grpo_fast.config import PRESETS, Config

TIMINGS = {"tokens_per_s", "rollout_s", "update_s", "peak_mem_mb"}
SMALL = dict(prompts_per_step=4, group_size=4, micro_batch_groups=1, max_steps=3, save_steps=0, cpu_threads=1)
SMALL |= dict(progress=False, log_samples_steps=1, plot_steps=0)

# Every rank dumps its full weights before the final save: the test's only view of rank 1. It runs train.main,
# exactly what `-m grpo_fast.train` runs.
LAUNCHER = """
import sys, torch
from grpo_fast import distributed, train
real = train.save_final
def save_final(model, tokenizer, out):
    state = distributed.unwrap(model).state_dict()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}  # fsdp2: collective
    torch.save(full, out / f"rank{distributed.world()[0]}.pt")
    real(model, tokenizer, out)
train.save_final = save_final
sys.exit(train.main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("trainer_cpu_path")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [name if v else "--no-" + name[2:]]
        else:
            out += [name, *map(str, v)] if isinstance(v, list) else [name, str(v)]
    return out


def torchrun(tmp_path, values: dict, script: bool = True) -> subprocess.CompletedProcess:
    """2 CPU processes on loopback; `script`: through LAUNCHER, else `-m grpo_fast.train`."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    target = [str(launcher)] if script else ["-m", "grpo_fast.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), *target, *flags(values)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def single(tmp_path, values: dict) -> list[dict]:
    """The same global batch in one process, sampled in chunks of one rank's share of prompts."""
    share = values["prompts_per_step"] // 2
    cfg = dataclasses.replace(Config(**PRESETS["tiny"]), **values, rollout_groups=share)
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "single"))
    return train.run(cfg)


def assert_same_run(two_ranks, one, rows: list[dict], rtol, atol) -> None:
    """Per-step metrics (no timings) and final weights of the 2-rank run in `two_ranks` equal the single-process
    run's (`rows`, written to `one`)."""
    got = [{k: v for k, v in r.items() if k not in TIMINGS} for r in run_log.read_jsonl(two_ranks / "metrics.jsonl")]
    want = [{k: v for k, v in r.items() if k not in TIMINGS} for r in json.loads(json.dumps(rows))]
    assert [r["step"] for r in got] == [r["step"] for r in want] and set(got[0]) == set(want[0])
    for g, w in zip(got, want):
        for k in w:
            expected = w[k] if w[k] is None else pytest.approx(w[k], rel=rtol, abs=atol)  # None: no value (both)
            assert g[k] == expected, (g["step"], k)
    a, b = load_file(two_ranks / "final" / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    assert set(a) == set(b)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in b])
    # Adam divides by sqrt(v): a weight whose gradients are ~0 turns summation-order noise into up to ~1e-5 (the
    # largest weight change in these runs is ~1e-2); the bulk agrees to fp32 rounding
    assert diff.max() < 5e-5 and diff.mean() < 1e-7, (diff.max(), diff.mean())


def test_ddp_two_ranks_equal_one_process(tmp_path):
    # batch-wide std (all ranks' rewards), dapo over the global token count, old and reference log-probs
    values = SMALL | dict(scale_rewards="batch", loss_type="dapo", num_iterations=2, beta=0.04, save_steps=2)
    run = torchrun(tmp_path, values | dict(output_dir=str(tmp_path / "ddp")))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "ddp"
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # replicas never drift
    one = single(tmp_path, values)
    assert one[0]["step"] == 0 and "eval_pass_rate" in one[0]  # step 0: the held-out evaluation alone
    assert any(r["reward_std"] > 0 and r["grad_norm"] > 0 for r in one[1:])  # a real signal went through
    assert_same_run(out, tmp_path / "single", one, rtol=1e-5, atol=1e-6)
    state = json.loads((checkpoint.latest(out / "checkpoints") / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    files = {"checkpoints", "config.json", "final", "metrics.jsonl", "samples.jsonl", "reward_curve.png"}
    assert {p.name for p in out.iterdir()} == files | {"rank0.pt", "rank1.pt"}  # metrics: one row per step (above)

    # resume with another world size: a clear error before any step
    before = (out / "metrics.jsonl").read_text()
    more = values | dict(output_dir=str(out), max_steps=4, resume=True)
    cfg = dataclasses.replace(Config(**PRESETS["tiny"]), **more)
    with pytest.raises(ValueError, match="written by 2 processes, this run has world size 1"):
        train.run(cfg)
    assert (out / "metrics.jsonl").read_text() == before


def test_fsdp2_two_ranks_with_resume_equal_one_process(tmp_path):
    # group std, grpo (rows) normalization; sharded (DCP) checkpoints at steps 2 and 3; step 3's is dropped (as if
    # the run died during step 3) and --resume recomputes step 3 from step 2's
    values = SMALL | dict(loss_type="grpo", parallel="fsdp2", save_steps=2)
    out = tmp_path / "fsdp2"
    run = torchrun(tmp_path, values | dict(output_dir=str(out)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in checkpoint.all_checkpoints(out / "checkpoints")] == [
        "checkpoint-0000002",
        "checkpoint-0000003",
    ]
    assert (checkpoint.latest(out / "checkpoints") / "dcp").is_dir()
    shutil.rmtree(checkpoint.latest(out / "checkpoints"))
    (out / "rank0.pt").unlink()
    run = torchrun(tmp_path, values | dict(output_dir=str(out), resume=True))
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    one = single(tmp_path, values)
    assert_same_run(out, tmp_path / "single", one, rtol=1e-4, atol=1e-5)
    assert [r["step"] for r in one] == [0, 1, 2, 3]  # step 0: the held-out evaluation, on every rank (fsdp2)


@pytest.mark.slow
def test_dynamic_sampling_and_entropy_quantile_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """Issue 11: dynamic sampling decides on every rank's rewards (extra batches, dropped groups and the groups each
    rank trains agree with one process), the entropy quantile ranks every rank's tokens (a variable-length gather),
    the entropy bonus averages over the step's kept tokens; mask_truncated_completions and luspo's per-row sums."""
    (tmp_path / "gate_ranks.py").write_text(
        "def gated(prompts, completions, completion_ids, **kw):\n"
        "    return [float(ids[0]) if p[0] in 'abcd' and ids else 0.5 for p, ids in zip(prompts, completion_ids)]\n"
    )  # e-h prompts: one reward for the whole group, dropped
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    values = SMALL | dict(
        rewards=["gate_ranks:gated"], dynamic_sampling=True, top_entropy_quantile=0.5, entropy_coef=0.01
    )
    values |= dict(loss_type="luspo", mask_truncated_completions=True)
    out = tmp_path / "ddp"
    run = torchrun(tmp_path, values | dict(output_dir=str(out)))
    assert run.returncode == 0, run.stderr[-3000:]
    one = single(tmp_path, values)
    trained = one[1:]  # one[0]: step 0's held-out evaluation
    assert sum(r["extra_prompts"] for r in trained) > 0 and all(r["groups_trained"] == 4 for r in trained)
    assert_same_run(out, tmp_path / "single", one, rtol=1e-5, atol=1e-6)


def test_prompts_not_divisible_by_world_size_fails_before_training(tmp_path):
    run = torchrun(tmp_path, SMALL | dict(prompts_per_step=3, output_dir=str(tmp_path / "run")), script=False)
    assert run.returncode != 0
    assert "prompts_per_step=3 must be divisible by the world size 2" in run.stderr
    assert not (tmp_path / "run").exists()


def test_missing_backend_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    cfg = dataclasses.replace(Config(**PRESETS["tiny"]), **SMALL, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="distributed backend 'gloo' .* is not available"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()
