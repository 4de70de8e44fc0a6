"""The summary of a device check (bench/device_check.sh): `python -m bench.device_summary WORK OUT_DIR`.

Reads the check's working directory (parts.tsv: each part's exit status and seconds; tests.xml: pytest's JUnit
report; results/<suite>_*.json: the suites that finished; rows.jsonl: every row as it finished, and each suite
process's env and ceilings) and writes into OUT_DIR one JSON per suite in bench/results/'s format (a suite stopped at
its time cap is rebuilt from its finished rows, with "partial": true) and summary.json. Prints the summary as one
JSON line, last: the device, versions, each part, the test counts, and per row its time and fraction of the physical
floor (grpo_loss: the bytes floor at the copy bandwidth; fused_linear: the FLOP floor at the matmul rate; engine and
step: their docstrings' floors), plus the ops/step and log-prob agreement rows' numbers. Exit status 1 if a part
failed or was stopped, or a test failed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import common

SUITES = ("grpo_loss", "fused_linear", "engine", "step")
KEPT = ("kernels_per_step", "launches_per_step", "aten_ops_per_step", "rollout_logp_diff_mean",
        "rollout_logp_diff_max", "rollout_ratio_outside", "prefill_ms", "decode_ms", "peak_mb")  # fmt: skip


def parts(work: Path) -> list[dict]:
    lines = (work / "parts.tsv").read_text().splitlines() if (work / "parts.tsv").exists() else []
    out = []
    for line in lines:
        name, rc, seconds, cap = line.split("\t")
        stopped = rc in ("124", "137")  # timeout's exit status, or its KILL after the grace period
        out.append({"part": name, "rc": int(rc), "seconds": int(seconds), "cap_s": int(cap), "stopped": stopped})
    return out


def tests(work: Path) -> dict:
    """Counts from pytest's JUnit XML (absent: the tests did not finish)."""
    path = work / "tests.xml"
    if not path.exists():
        return {"finished": False}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"finished": True, "passed": passed, "failed": n["failures"] + n["errors"], "skipped": n["skipped"],
            "failed_tests": failed[:20]}  # fmt: skip


def streamed(work: Path) -> tuple[list[dict], list[dict]]:
    """(rows, contexts) from rows.jsonl."""
    path = work / "rows.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if "suite" in r], [r for r in records if "ceilings" in r]


def suite_payloads(work: Path) -> dict[str, dict]:
    """Per suite: its JSON when the suite finished, else one rebuilt from its streamed rows (partial)."""
    rows, contexts = streamed(work)
    out = {}
    for suite in SUITES:
        done = sorted((work / "results").glob(f"{suite}_*.json"))
        if done:
            out[suite] = json.loads(done[-1].read_text())
            continue
        started = [c for c in contexts if suite in c.get("suites", ())]
        if started:  # stopped at its cap: the rows it finished
            context = {k: started[-1][k] for k in ("env", "ceilings", "quick")}
            out[suite] = {"suite": suite, **context, "partial": True, "rows": [r for r in rows if r["suite"] == suite]}
    return out


def frac_floor(r: dict) -> float | None:
    """The row's time floor / its time, whatever unit its suite reports."""
    if r.get("frac_floor") is not None:
        return r["frac_floor"]
    if r.get("frac_copy") is not None:  # grpo_loss: bytes floor at the copy bandwidth
        return r["frac_copy"]
    if r.get("x_floor"):  # fused_linear: median / FLOP floor
        return 1.0 / r["x_floor"]
    return None


def summary_row(r: dict) -> dict:
    out = {k: r.get(k) for k in ("suite", "case", "mode", "provider", "status")}
    if r.get("status") != "ok":
        return out | {"reason": r.get("reason", "")[:160]}
    out |= {"median_ms": r.get("median_ms"), "frac_floor": frac_floor(r)}
    out |= {k: r[k] for k in KEPT if r.get(k) is not None}
    return {k: v for k, v in out.items() if v is not None}


def main(argv: list[str]) -> int:
    work, out = Path(argv[0]), Path(argv[1])
    payloads = suite_payloads(work)
    files = []
    for suite, p in payloads.items():
        if p.get("env"):
            args = (suite, p["rows"], p["env"], p["ceilings"], out, bool(p.get("quick")), bool(p.get("partial")))
            files.append(str(common.write_json(*args)))
    env = next((p["env"] for p in payloads.values() if p.get("env")), {})
    summary = {
        "device": env.get("device"), "date": env.get("date"), "python": env.get("python"), "cuda": env.get("cuda"),
        "versions": env.get("versions"), "git_commit": env.get("git_commit"),
        "ceilings": next((p["ceilings"] for p in payloads.values() if p.get("ceilings")), None),
        "parts": parts(work), "tests": tests(work),
        "partial_suites": [s for s, p in payloads.items() if p.get("partial")],
        "rows": [summary_row(r) for p in payloads.values() for r in p["rows"]],
        "files": [Path(f).name for f in files],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    common.emit_json(summary)
    failed = any(p["rc"] != 0 for p in summary["parts"]) or summary["tests"].get("failed", 1) != 0
    return 1 if failed or summary["partial_suites"] or set(payloads) != set(SUITES) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
