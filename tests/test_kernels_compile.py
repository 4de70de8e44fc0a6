"""The Triton kernels compile for a real GPU (H100, sm_90) with no GPU present: PTX and a cubin by ptxas.

The interpreter that runs the kernels in the other tests accepts code the compiler rejects (tensor loop
bounds, dtype mixes, tl.dot shapes). `compile_kernels_sm90.py` runs every launcher on meta tensors,
records the signatures and constexprs it would launch on a GPU, and compiles each for sm_90 in a
subprocess without TRITON_INTERPRET (conftest.py sets it here, and @triton.jit reads it at import).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_kernels_sm90.py")
MAX_SHARED = 232448  # bytes of shared memory one H100 block may use
REGISTER_FILE = 65536  # 32-bit registers per SM: one block of num_warps * 32 threads must fit
GPU_NEVER = {"ROUND_BF16": False}  # an interpreter-only rounding fix: always False on a GPU
GRPO_FLAGS = ("ADV_MODE", "HAS_OLD", "HAS_REF", "USE_BETA", "HAS_DELTA", "COMPUTE_GRAD")
GRPO_FLAGS += ("LOSS_KIND", "BIAS_KL", "IS_MODE", "ENT_BONUS")


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{SCRIPT.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    cols = ("kernel", "case", "num_warps", "n_regs", "spill_bytes", "shared")
    return "\n".join("  ".join(f"{c}={r.get(c)}" for c in cols) for r in rows)


def test_every_launch_compiles_to_a_cubin(compiled):
    failed = [r for r in compiled["results"] if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']} [{r['case']}] {r['constexprs']}\n{r.get('error')}" for r in failed)


def test_every_kernel_is_compiled(compiled):
    """A new `*_kernel` in grpo_fast.kernels must get its launcher recorded in compile_kernels_sm90.py."""
    done = {r["kernel"] for r in compiled["results"]}
    assert set(compiled["kernels"]) <= done, f"never compiled: {sorted(set(compiled['kernels']) - done)}"
    assert len(compiled["kernels"]) >= 4


def test_bf16_and_fp32_inputs_for_every_kernel(compiled):
    seen = {}
    for r in compiled["results"]:
        types = r["types"]
        seen.setdefault(r["kernel"], set()).add(types.get("logits_ptr", types.get("h_ptr")))
    missing = {k: v for k, v in seen.items() if not {"*bf16", "*fp32"} <= v}
    assert not missing, f"input dtypes compiled: {missing}"


def test_every_flag_takes_every_gpu_value(compiled):
    """Each boolean constexpr is compiled both ways (ROUND_BF16 only False: True is the interpreter's)."""
    values: dict = {}
    for r in compiled["results"]:
        for name, v in r["constexprs"].items():
            values.setdefault((r["kernel"], name), set()).add(v)
    for (kernel, name), got in values.items():
        if all(isinstance(v, bool) for v in got):
            want = {GPU_NEVER[name]} if name in GPU_NEVER else {False, True}
            assert got == want, f"{kernel} {name}: compiled with {got}, expected {want}"
    for name, want in (("ADV_MODE", {0, 1, 2, 3}), ("LOSS_KIND", {0, 1, 2}), ("IS_MODE", {0, 1, 2})):
        got = values[("grpo_loss._grpo_token_kernel", name)]
        assert got == want, (name, got)


def test_grpo_flags_pairwise(compiled):
    """Every value pair of any two GRPO token-kernel flags is compiled together (beta needs ref_logps)."""
    combos = {
        tuple(r["constexprs"][f] for f in GRPO_FLAGS)
        for r in compiled["results"]
        if r["kernel"] == "grpo_loss._grpo_token_kernel"
    }
    domains = [(0, 1, 2, 3)] + [(False, True)] * 5 + [(0, 1, 2), (False, True), (0, 1, 2), (False, True)]
    possible = [c for c in itertools.product(*domains) if c[2] or not c[3]]  # USE_BETA implies HAS_REF
    pairs = lambda cs: {p for c in cs for p in itertools.combinations(enumerate(c), 2)}  # noqa: E731
    assert pairs(possible) <= pairs(combos), f"uncovered pairs: {sorted(pairs(possible) - pairs(combos))}"


def test_registers_and_shared_memory_fit_an_h100(compiled):
    rows = compiled["results"]
    no_stats = [r for r in rows if r["n_regs"] is None or r["spill_bytes"] is None]
    assert not no_stats, f"no ptxas -v statistics:\n{_table(no_stats)}"
    too_big = [
        r
        for r in rows
        if r["shared"] > MAX_SHARED or r["n_regs"] * 32 * r["num_warps"] > REGISTER_FILE or r["n_regs"] > 255
    ]
    assert not too_big, f"cannot launch on an H100:\n{_table(too_big)}"


def test_main_configurations_do_not_spill(compiled):
    """Spilled registers go to local memory (L1/L2 traffic) in the hot loop. The configurations training
    runs (aligned shapes, no LM-head bias) must not spill; the others are printed by the script."""
    main = [r for r in compiled["results"] if r["main"]]
    assert len(main) >= 10
    spilled = [r for r in main if r["spill_bytes"]]
    assert not spilled, f"register spills:\n{_table(spilled)}"
