"""Shared benchmark harness: environment record, timing, peak memory, measured ceilings, optional peers,
result rows, the table printer and JSON output.

A suite is a module `bench/bench_<name>.py` that defines

    SUITE = "<name>"
    def run(quick: bool, device: torch.device, ceilings: dict) -> list[dict]:   # result rows

and ends with `if __name__ == "__main__": common.main(SUITE, run)`. `bench/run.py` finds every such module.

A row (see `row`) is a flat dict: suite, case (shape/options string), mode, provider, status ("ok",
"missing", "skipped", "error"), reason, median_ms, lo_ms/hi_ms (CUDA: 20/80% quantiles; CPU: min/max),
peak_mb (CUDA only; None on CPU), plus suite-specific units (gbps, frac_copy, tflops, frac_matmul, ...).

Typical suite code, one row per (case, mode, provider):

    def make():                                        # may raise Missing / Skipped; any other error -> "error"
        loss_fn = ...                                  # closure returning the scalar loss
        return mode_fn(loss_fn, [logits], mode)        # forward / backward (a Staged) / full
    rows.append(run_provider(SUITE, case, mode, provider, make, device, quick))

measure() times a callable (CUDA: triton.testing.do_bench; CPU: a repeat timer) or a Staged (untimed setup
before each timed call), and adds peak_mb. measure_ceilings() gives the copy bandwidth and matmul rate
results are expressed against; grpo_companions() builds realistic GRPO inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QWEN25 = {  # Qwen2.5 configs (real sizes; the suites use random weights): engine and step
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
    ),
}  # fmt: skip
PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "trl", "grpo-fast")
TABLE_COLUMNS = ("case", "mode", "provider", "median_ms", "lo_ms", "hi_ms", "peak_mb")


class Missing(Exception):
    """An optional peer (Liger-Kernel, TRL, ...) does not import: its row says `missing: <reason>`."""


class Skipped(Exception):
    """A provider cannot run this case here (e.g. torch.compile fails on CPU): row says `skipped: <reason>`."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which part of a suite runs. `headline`: each suite's headline cases, providers and modes (what the device
    check runs, bench/device_check.sh); `case`: only the cases whose name contains this text."""

    headline: bool = False
    case: str | None = None

    def cases(self, cases: list, name: Callable[[Any], str] = lambda c: c.name) -> list:
        """Cases kept; a case object says whether it is a headline case with a `headline` attribute (or key)."""
        flag = lambda c: c["headline"] if isinstance(c, dict) else c.headline  # noqa: E731
        kept = [c for c in cases if (not self.headline or flag(c)) and (self.case is None or self.case in name(c))]
        return kept

    def pick(self, items, headline_items):
        """`items` (a dict or a sequence), only those named in `headline_items` under --headline, in their order."""
        if not self.headline:
            return items
        if isinstance(items, dict):
            return {k: v for k, v in items.items() if k in headline_items}
        return type(items)(x for x in items if x in headline_items)


EVERYTHING = Selection()
ROWS_ENV = "GRPO_FAST_BENCH_ROWS"  # a JSONL file every finished row is appended to (device_check.sh: partial suites)


def stream(r: dict) -> dict:
    """Appends the row to $GRPO_FAST_BENCH_ROWS when set (so a suite stopped by a time cap keeps its finished
    rows), and returns it."""
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
    return r


# ----------------------------------------------------------------------------------------------- environment


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def _git_commit() -> str | None:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """What a recorded result must carry: device, date, versions (None = not installed), CUDA, commit."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "versions": {pkg: _version(pkg) for pkg in PACKAGES},
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }


def device_slug(env: dict[str, Any]) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; every CPU -> 'cpu'."""
    if env["device_type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


# ----------------------------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Staged:
    """A measurement that needs untimed preparation before every timed call: `run(setup())` is timed
    without `setup()`. Backward uses it: each rep times one autograd.grad over a fresh forward's graph
    (a retained graph cannot be reused by in-place backwards or by torch.compile's donated buffers)."""

    setup: Callable[[], Any]
    run: Callable[[Any], Any]


def _stats(times: list[float], spread: str) -> dict[str, Any]:
    times = sorted(times)
    if spread == "p20-p80":
        q = lambda f: times[min(len(times) - 1, round(f * (len(times) - 1)))]
        lo, hi = q(0.2), q(0.8)
    else:
        lo, hi = times[0], times[-1]
    return {"median_ms": statistics.median(times), "lo_ms": lo, "hi_ms": hi, "spread": spread, "reps": len(times)}


def time_staged(staged: Staged, device: torch.device, quick: bool = False) -> dict[str, Any]:
    """time_fn's keys for a Staged measurement; CUDA events around each timed call, 20/80% quantiles on CUDA."""
    warmup, reps = (0, 2) if quick else ((3, 20) if device.type == "cuda" else (1, 5))
    for _ in range(warmup):
        staged.run(staged.setup())
    times = []
    for _ in range(reps):
        arg = staged.setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            staged.run(arg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            staged.run(arg)
            times.append((time.perf_counter() - t0) * 1e3)
        del arg
    return _stats(times, "p20-p80" if device.type == "cuda" else "min-max")


def time_fn(fn: Callable[[], Any], device: torch.device, quick: bool = False) -> dict[str, Any]:
    """Median and spread of `fn()` in ms. CUDA: triton.testing.do_bench (L2 flushed, events), 20/80% quantiles.
    CPU: a repeat timer, min/max. Keys: median_ms, lo_ms, hi_ms, spread ("p20-p80" or "min-max"), reps."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 200)  # ms of warm-up / measurement, as do_bench counts them
        med, lo, hi = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "lo_ms": lo, "hi_ms": hi, "spread": "p20-p80", "reps": None}
    warmup, reps = (0, 2) if quick else (2, 10)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times, "min-max")


def peak_memory_mb(fn: Callable[[], Any] | Staged, device: torch.device) -> float | None:
    """Peak memory one call of `fn` (a Staged: of `run`, after its setup) allocates beyond what was allocated
    before it, in MB (1e6 bytes). CUDA only: on CPU torch keeps no allocator statistics, so this returns None."""
    if device.type != "cuda":
        return None
    arg = fn.setup() if isinstance(fn, Staged) else None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn.run(arg) if isinstance(fn, Staged) else fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, arg
    return peak / 1e6


def measure(fn: Callable[[], Any] | Staged, device: torch.device, quick: bool = False) -> dict[str, Any]:
    """time_fn's (or time_staged's) keys plus peak_mb, measured first on a warm call (CUDA)."""
    staged = isinstance(fn, Staged)
    peak = None
    if device.type == "cuda":
        fn.run(fn.setup()) if staged else fn()  # warm: compile / autotune before measuring memory
        peak = peak_memory_mb(fn, device)
    timing = time_staged(fn, device, quick) if staged else time_fn(fn, device, quick)
    return {**timing, "peak_mb": peak}


def copy_gbps(device: torch.device, quick: bool = False) -> float:
    """Device-to-device copy bandwidth, counting bytes read + written (2 * numel * 4), in GB/s."""
    numel = (1 << 20) if quick else (1 << 28 if device.type == "cuda" else 1 << 25)  # 1 GiB fp32 on CUDA
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick)
    return 2 * numel * 4 / (t["median_ms"] * 1e-3) / 1e9


def matmul_tflops(device: torch.device, quick: bool = False, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """Square matmul rate on random data in TFLOP/s, and its dtype (bf16: the dtype the suites' GEMMs run in)."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, quick)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12, str(dtype).replace("torch.", "")


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """The physical ceilings results are expressed against, measured in this run on this device:
    {"copy_gbps", "matmul_tflops", "matmul_dtype"}."""
    tflops, dtype = matmul_tflops(device, quick)
    return {"copy_gbps": copy_gbps(device, quick), "matmul_tflops": tflops, "matmul_dtype": dtype}


# ----------------------------------------------------------------------------------------------- peers, rows


def import_peer(module: str, attr: str | None = None) -> Any:
    """Import an optional peer (`import_peer("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")`).
    Raises Missing with the reason when it does not import (not installed, or broken on this machine)."""
    try:
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod
    except Exception as e:  # ImportError, AttributeError, or a peer failing at import on this platform
        raise Missing(f"{module}{'.' + attr if attr else ''}: {type(e).__name__}: {e}".splitlines()[0][:200]) from e


def row(suite: str, case: str, mode: str, provider: str, status: str = "ok", reason: str = "", **values) -> dict:
    """One result row; `values` holds the measurements (median_ms, lo_ms, hi_ms, peak_mb, gbps, ...)."""
    return {
        "suite": suite,
        "case": case,
        "mode": mode,
        "provider": provider,
        "status": status,
        "reason": reason,
        **values,
    }


def failed_row(suite: str, case: str, mode: str, provider: str, exc: BaseException) -> dict:
    """Row for a provider that did not produce a timing: missing peer, skipped case, or an error."""
    status = "missing" if isinstance(exc, Missing) else "skipped" if isinstance(exc, Skipped) else "error"
    reason = str(exc) if isinstance(exc, (Missing, Skipped)) else f"{type(exc).__name__}: {exc}"
    return row(suite, case, mode, provider, status, reason.splitlines()[0][:300] if reason else status)


def run_provider(
    suite: str,
    case: str,
    mode: str,
    provider: str,
    make_fn: Callable[[], Callable[[], Any] | Staged],
    device: torch.device,
    quick: bool,
    **extra,
) -> dict:
    """Build the provider's callable, measure it, and return its row; failures become missing/skipped/error rows.
    `extra` values are copied into the row (e.g. floor bytes or FLOPs the suite derives units from)."""
    try:
        return row(suite, case, mode, provider, **measure(make_fn(), device, quick), **extra)
    except Exception as e:  # a failing provider is a row, never a crash of the suite
        return failed_row(suite, case, mode, provider, e)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_grid(suite: str, cases, modes, providers, bench_fn, units, device: torch.device, quick: bool) -> list[dict]:
    """Every case x mode x provider as a row: `bench_fn(provider, case, mode, device, quick)` builds the callable,
    `units(row, case)` adds the suite's physical units to an ok row."""
    rows = []
    for case in cases:
        for mode in modes:
            for provider in providers:
                make = lambda p=provider, c=case, m=mode: bench_fn(p, c, m, device, quick)
                rows.append(stream(units(run_provider(suite, case.name, mode, provider, make, device, quick), case)))
    return rows


def status_text(r: dict) -> str:
    return "ok" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"


# ----------------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """Fixed-width text table; columns default to TABLE_COLUMNS plus every other numeric key seen in `rows`."""
    if columns is None:
        skip = {"suite", "status", "reason", "spread", "reps", *TABLE_COLUMNS}
        extra = [k for r in rows for k, v in r.items() if k not in skip and isinstance(v, (int, float))]
        columns = (*TABLE_COLUMNS, *dict.fromkeys(extra))
    cells = [[_fmt(r.get(c)) for c in columns] + [status_text(r)] for r in rows]
    header = [*columns, "status"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the status column is last: no padding, reasons may be long
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def result_path(suite: str, env: dict[str, Any], out_dir: Path | str | None = None) -> Path:
    """bench/results/<suite>_<device-slug>_<YYYY-MM-DD>.json (or the same name under out_dir)."""
    return Path(out_dir or RESULTS_DIR) / f"{suite}_{device_slug(env)}_{env['date'][:10]}.json"


def write_json(
    suite: str,
    rows: list[dict],
    env: dict,
    ceilings: dict,
    out_dir: Path | str | None = None,
    quick: bool = False,
    partial: bool = False,
) -> Path:
    """Write {suite, quick, env, ceilings, rows} (and "partial": true for a suite stopped before its end) to
    result_path(...); returns the path."""
    path = result_path(suite, env, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, "quick": quick, "env": env, "ceilings": ceilings, "rows": rows}
    payload |= {"partial": True} if partial else {}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def emit_json(payload: dict) -> None:
    """Print `payload` as one JSON line: every script's last stdout line."""
    print(json.dumps(payload, default=str), flush=True)


# ----------------------------------------------------------------------------------------------- script entry


def make_parser(description: str = "") -> argparse.ArgumentParser:
    """The options every benchmark script takes: --quick, --headline, --case, --device, --out-dir, --no-write."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny CPU-friendly shapes (smoke run; numbers meaningless)")
    p.add_argument("--headline", action="store_true", help="each suite's headline cases, providers and modes only")
    p.add_argument("--case", default=None, help="only the cases whose name contains this text")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out-dir", default=None, help=f"where JSON goes (default: {RESULTS_DIR}; a tmp dir with --quick)")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON file")
    return p


def selection(args: argparse.Namespace) -> Selection:
    return Selection(headline=args.headline, case=args.case)


def run_suites(
    suites: dict[str, Callable],
    quick: bool,
    device: torch.device,
    out_dir=None,
    write: bool = True,
    select: Selection = EVERYTHING,
) -> dict:
    """Measure the ceilings once, run each suite (its `select`ed part), print its table, write its JSON; returns the
    summary {env, ceilings, files, rows} that scripts print as their last line."""
    if out_dir is None and quick:  # smoke numbers are not records: keep them out of bench/results/
        out_dir = Path(tempfile.gettempdir()) / "grpo_fast_bench_quick"
    env = environment(device)
    ceilings = measure_ceilings(device, quick)
    stream({"suites": list(suites), "env": env, "ceilings": ceilings, "quick": quick})  # for a stopped suite's rows
    print(
        f"# {env['device']}  torch {env['versions']['torch']}  triton {env['versions']['triton']}  "
        f"copy {ceilings['copy_gbps']:.1f} GB/s  matmul {ceilings['matmul_tflops']:.2f} TFLOP/s",
        flush=True,
    )
    files, all_rows = [], []
    for name, run in suites.items():
        rows = run(quick, device, ceilings, select)
        print(f"\n## {name}\n{format_table(rows)}", flush=True)
        if write:
            files.append(str(write_json(name, rows, env, ceilings, out_dir, quick)))
        all_rows.extend(rows)
    return {"quick": quick, "env": env, "ceilings": ceilings, "files": files, "rows": all_rows}


def main(suite: str, run: Callable, argv: list[str] | None = None) -> None:
    """`python bench/bench_<suite>.py [--quick] [--device D] [--out-dir DIR] [--no-write]`."""
    args = make_parser(f"benchmark suite {suite}").parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    summary = run_suites({suite: run}, args.quick, device, args.out_dir, not args.no_write, selection(args))
    emit_json(summary)
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- GRPO inputs


def grpo_companions(logps: torch.Tensor, group_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Realistic per-row / per-token GRPO inputs around the current log-probs `logps` (B, T):
    completion_mask with padded tails (every row keeps >= 1 token), rewards (B,) in groups of `group_size`
    and their advantages, old/ref log-probs = logps + noise so that some ratios clip low, some high."""
    from grpo_fast import reference  # here, not at the top: bench.device_summary imports this module without a model

    B, T = logps.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T), TRL's int mask
    rewards = torch.randint(0, 2, (B,), generator=g).float() + 0.1 * torch.randn(B, generator=g)
    old_noise = 0.3 * torch.randn(B, T, generator=g)  # |noise| > log(1.2) ~ 0.18 often: clips both ways
    ref_noise = 0.1 * torch.randn(B, T, generator=g)
    sampler_noise = 0.1 * torch.randn(B, T, generator=g)  # an inference engine's log-probs drift from training's
    out = {
        "completion_mask": mask,
        "rewards": rewards,
        "old_logps": logps.float().cpu() + old_noise,
        "ref_logps": logps.float().cpu() + ref_noise,
        "importance_sampling_ratio": torch.exp(-sampler_noise).clamp(max=2.0),  # vLLM token_truncate
    }
    out["sampling_logps"] = out["old_logps"] + sampler_noise
    out = {k: v.to(logps.device) for k, v in out.items()}
    out["advantages"] = reference.group_advantages(out["rewards"], group_size)
    return out


FROM_INPUTS = "<from inputs>"  # a VARIANTS value: the per-call tensor of that name, from grpo_companions

# TRL 1.16's loss options beyond the suites' dapo + KL, each a benchmark line: the first four are per-token terms
# of the one-pass path, the last four need a row- or batch-level quantity of the current log-probs first
# (grpo_loss: two passes over the logits; fused linear: the same sweeps as every option).
VARIANTS = {
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo"),
    "bias_kl+vllm_is": dict(use_bias_correction_kl=True, importance_sampling_ratio=FROM_INPUTS),
    "entropy_coef": dict(entropy_coef=0.01),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "vespo": dict(loss_type="vespo"),
    "top_entropy_quantile": dict(top_entropy_quantile=0.2),
    "off_policy_mask": dict(off_policy_mask_threshold=0.5, sampling_logps=FROM_INPUTS),
}


def variant_kwargs(variant: str | None, inputs: dict) -> dict:
    """A variant's loss keywords, its per-call tensors (FROM_INPUTS in VARIANTS) taken from `inputs`."""
    if variant is None:
        return {}
    return {k: (inputs[k] if v == FROM_INPUTS else v) for k, v in VARIANTS[variant].items()}


def mode_fn(loss_fn: Callable[[], torch.Tensor], wrt: list[torch.Tensor], mode: str) -> Callable[[], Any] | Staged:
    """What a mode times. forward: the loss with grad enabled (what training pays before backward);
    backward: autograd.grad over a fresh, untimed forward (a Staged); full: forward + autograd.grad.
    Gradients are returned, never accumulated into .grad."""
    if mode == "forward":
        return loss_fn
    if mode == "full":
        return lambda: torch.autograd.grad(loss_fn(), wrt)
    if mode == "backward":
        return Staged(loss_fn, lambda loss: torch.autograd.grad(loss, wrt))
    raise ValueError(f"mode must be forward, backward or full, got {mode!r}")


def run_pytest_benchmark(benchmark, fn: Callable[[], Any] | Staged, device: torch.device, rounds: int = 10) -> None:
    """Time `fn` with pytest-benchmark's fixture (synchronizing CUDA); a Staged runs its setup untimed."""
    if isinstance(fn, Staged):
        setup = lambda: ((fn.setup(),), {})
        benchmark.pedantic(lambda arg: (fn.run(arg), sync(device)), setup=setup, rounds=rounds, warmup_rounds=1)
    else:
        benchmark(lambda: (fn(), sync(device)))
