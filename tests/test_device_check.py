"""bench/device_check.sh --dry-run: the GPU check's steps on CPU at tiny shapes, kernels interpreted (~45 s on 2 CPU
cores: setup, a few tests, the four suites' headline selection, the summary); and the summary of a check whose suite
was stopped at its time cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of the repository, not an installed package

from bench import common, device_summary  # noqa: E402

SUITES = ("grpo_loss", "fused_linear", "engine", "step")


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", "bench/device_check.sh", "--dry-run", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["device"] and summary["versions"]["torch"] and summary["versions"]["transformers"]
    assert [p["part"] for p in summary["parts"]] == ["setup", "tests", "suites"]
    assert all(p["rc"] == 0 and not p["stopped"] for p in summary["parts"])
    assert summary["tests"]["passed"] >= 2 and summary["tests"]["failed"] == 0
    assert not summary["partial_suites"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.json", "tests.log", "bench.log"} <= set(files)  # the device tool's limit
    for suite in SUITES:
        rows = [r for r in summary["rows"] if r["suite"] == suite]
        assert rows and not [r for r in rows if r["status"] == "error"], rows
        timed = [r for r in rows if r["status"] == "ok" and r["mode"] not in ("ops/step", "logp_diff")]
        assert timed and all(r["median_ms"] > 0 and r["frac_floor"] > 0 for r in timed), timed
        (path,) = out.glob(f"{suite}_*.json")  # bench/results/'s format, its name
        data = json.loads(path.read_text())
        assert path.name == common.result_path(suite, data["env"]).name and data["rows"] and data["ceilings"]
    engine = {(r["mode"], r["provider"]): r for r in summary["rows"] if r["suite"] == "engine"}
    assert engine[("ops/step", "grpo_fast[eager]")]["aten_ops_per_step"] > 0
    assert engine[("logp_diff", "grpo_fast")]["rollout_logp_diff_max"] < 1e-4  # fp32 on CPU


def test_summary_of_a_stopped_suite(tmp_path, capsys):
    """A suite stopped at its cap keeps the rows it streamed: its JSON is rebuilt, marked partial, and the check
    fails (exit status 1), naming the stopped part."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "results").mkdir(parents=True)
    out.mkdir()
    env = common.environment(common.default_device())
    context = {"suites": ["engine"], "env": env, "ceilings": {"copy_gbps": 10.0, "matmul_tflops": 1.0}, "quick": False}
    row = common.row("engine", "c", "rollout", "grpo_fast[eager]", median_ms=2.0, frac_floor=0.5)
    (work / "rows.jsonl").write_text(json.dumps(context) + "\n" + json.dumps(row) + "\n")
    (work / "parts.tsv").write_text("setup\t0\t3\t40\ntests\t0\t50\t120\nengine\t124\t100\t100\n")
    assert device_summary.main([str(work), str(out)]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["partial_suites"] == ["engine"] and summary["tests"] == {"finished": False}
    assert [p["stopped"] for p in summary["parts"]] == [False, False, True]
    assert summary["rows"] == [{**{k: row[k] for k in ("suite", "case", "mode", "provider", "status")},
                                "median_ms": 2.0, "frac_floor": 0.5}]  # fmt: skip
    data = json.loads(next(out.glob("engine_*.json")).read_text())
    assert data["partial"] is True and data["rows"] == [row]
