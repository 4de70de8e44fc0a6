"""The benchmark harness runs end to end (--quick, tiny shapes) and its helpers behave; no timing is judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of the repository, not an installed package

from bench import bench_fused_linear, bench_grpo_loss, common  # noqa: E402

SUITES = {"grpo_loss": bench_grpo_loss, "fused_linear": bench_fused_linear}
PEERS = {"liger": "liger_kernel", "trl": "trl"}  # optional: a row either way, "missing" when absent


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m bench.run --quick` over both loss suites, results into a tmp dir; (stdout lines, out_dir)."""
    out_dir = tmp_path_factory.mktemp("bench_results")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU torch path, as users get it
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--suite", *SUITES, "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines(), out_dir


def test_last_line_is_json_with_a_row_per_provider(quick_run):
    lines, _ = quick_run
    summary = json.loads(lines[-1])
    assert summary["quick"] is True and summary["ceilings"]["copy_gbps"] > 0
    for suite, module in SUITES.items():
        rows = [r for r in summary["rows"] if r["suite"] == suite]
        assert {r["provider"] for r in rows} == set(module.PROVIDERS), suite
        assert {r["mode"] for r in rows} == set(module.MODES), suite
        errors = [(r["provider"], r["mode"], r["reason"]) for r in rows if r["status"] == "error"]
        assert not errors, errors
        for r in rows:
            if r["provider"].startswith(("grpo_fast", "torch")) and r["provider"] != "torch.compile":
                assert r["status"] == "ok", r
            if r["status"] == "ok":
                assert 0 < r["lo_ms"] <= r["median_ms"] <= r["hi_ms"], r
                assert r["peak_mb"] is None or r["peak_mb"] >= 0
                assert (r.get("gbps") or r.get("tflops")) > 0, r


@pytest.mark.parametrize("provider", list(PEERS))
def test_missing_peer_is_a_row_not_a_crash(quick_run, provider):
    rows = [r for r in json.loads(quick_run[0][-1])["rows"] if r["provider"] == provider]
    assert rows
    if not _importable(PEERS[provider]):
        assert all(r["status"] == "missing" and PEERS[provider] in r["reason"] for r in rows), rows
    else:
        assert all(r["status"] in ("ok", "skipped") for r in rows), rows


def test_json_files_carry_device_date_versions(quick_run):
    lines, out_dir = quick_run
    summary = json.loads(lines[-1])
    files = sorted(out_dir.glob("*.json"))
    assert sorted(map(Path, summary["files"])) == files and len(files) == len(SUITES)
    for f in files:
        data = json.loads(f.read_text())
        env = data["env"]
        assert f.name == f"{data['suite']}_{common.device_slug(env)}_{env['date'][:10]}.json"
        assert env["device"] and env["versions"]["torch"] == torch.__version__
        assert {"triton", "transformers", "peft", "liger-kernel", "trl"} <= set(env["versions"])
        assert data["rows"] and all(r["suite"] == data["suite"] for r in data["rows"])


def test_table_printed_per_suite(quick_run):
    text = "\n".join(quick_run[0][:-1])
    for suite in SUITES:
        assert f"## {suite}" in text
    assert "missing:" in text or all(_importable(m) for m in PEERS.values())


def test_failed_rows_classify_missing_skipped_error():
    cpu = torch.device("cpu")
    missing = common.run_provider("s", "c", "full", "p", lambda: common.import_peer("no_such_peer_xyz"), cpu, True)
    assert missing["status"] == "missing" and "no_such_peer_xyz" in missing["reason"]

    def skip():
        raise common.Skipped("not here")

    assert common.run_provider("s", "c", "full", "p", skip, cpu, True)["status"] == "skipped"
    broken = common.run_provider("s", "c", "full", "p", lambda: lambda: 1 / 0, cpu, True)
    assert broken["status"] == "error" and "ZeroDivisionError" in broken["reason"]
    assert "missing: " in common.format_table([missing])


def test_backward_mode_times_backward_only_and_returns_true_gradients():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)

    def loss_fn():
        time.sleep(0.2)  # an expensive forward: must stay outside the backward timing
        return (x.sin() ** 2).sum()

    staged = common.mode_fn(loss_fn, [x], "backward")
    (grad,) = staged.run(staged.setup())
    torch.testing.assert_close(grad, 2 * x.sin() * x.cos())
    (grad_full,) = common.mode_fn(loss_fn, [x], "full")()
    torch.testing.assert_close(grad_full, grad)
    assert common.measure(staged, torch.device("cpu"), quick=True)["median_ms"] < 150


def test_grpo_companions_hit_both_clip_branches():
    logps = -torch.rand(8, 64) * 5
    comp = common.grpo_companions(logps, group_size=4)
    ratio = torch.exp(logps - comp["old_logps"])
    active = comp["completion_mask"].bool()
    assert (ratio[active] < 0.8).any() and (ratio[active] > 1.28).any()
    assert comp["completion_mask"].sum(1).min() >= 1
    assert comp["advantages"].shape == (8,) and torch.isfinite(comp["advantages"]).all()


@pytest.mark.slow
def test_smollm2_suite_runs_both_trainers_in_their_own_processes(tmp_path):
    """bench/bench_smollm2.py --quick (a tiny Llama on the reverse task): a row per trainer, each with its step times,
    rewards and its own process's peak RSS, and the ratios the README quotes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "bench/bench_smollm2.py", "--quick", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["provider"]: r for r in summary["rows"]}
    assert set(rows) == {"grpo_fast", "trl"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert len(r["step_ms"]) == len(r["rewards"]) == 2 and r["reps"] == 1  # the first step is not timed
        assert all(0 <= x <= 1 for x in r["rewards"]) and r["peak_rss_mb"] > 100  # torch alone is more
        assert r["lo_ms"] == r["median_ms"] == r["hi_ms"] == r["step_ms"][1]
    ours, trl = rows["grpo_fast"], rows["trl"]
    assert ours["trl_over_grpo_fast_time"] == pytest.approx(trl["median_ms"] / ours["median_ms"])
    assert ours["trl_over_grpo_fast_rss"] == pytest.approx(trl["peak_rss_mb"] / ours["peak_rss_mb"])
    assert [f.name for f in tmp_path.glob("*.json")] == [f"smollm2_cpu_{summary['env']['date'][:10]}.json"]
