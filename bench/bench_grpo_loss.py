"""Benchmark: the GRPO loss over materialized logits (B, T, V), forward / backward / full.

Providers, measured in the same run: grpo_fast.grpo_loss (and with inplace_backward), the torch reference
eager in the logits' dtype, torch.compile of it, Liger-Kernel's Triton GRPO loss, TRL's
selective_log_softmax + the torch loss. Every call runs the full GRPO objective with its heaviest options:
old and reference log-probs, beta=0.04 (k3 KL), asymmetric clipping, dapo reduction. grpo_fast[<variant>]
adds one of TRL's other options (common.VARIANTS): cispo, sapo, bias-corrected KL with vLLM ratios and
the entropy bonus stay one pass; gspo, vespo, top_entropy_quantile and off_policy_mask take two (a forward
read, then the backward's read and write: 3*N*V*b against the floor's 2*N*V*b).

Shapes: N=8192, V=151936 (bf16 and fp32) on CUDA; N=512, V=32000 on a CPU; tiny with --quick.
--headline (the device check): N=8192, V=151936 bf16, mode full, grpo_fast against torch eager, torch.compile,
Liger and TRL.

Units: the bytes floor is N*V*b for forward (read the logits once), N*V*b for backward (write dlogits
once) and 2*N*V*b for full, N = B*T; gbps = floor / median time, frac_copy = gbps / the copy bandwidth
measured in this run. peak_mb: CUDA memory allocated by one call beyond its inputs (None on CPU).

    python bench/bench_grpo_loss.py [--quick]            # table, JSON under bench/results/, last line JSON
    pytest bench/bench_grpo_loss.py --benchmark-only     # the same providers through pytest-benchmark
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import grpo_fast  # noqa: E402
from bench import common  # noqa: E402
from grpo_fast import chunked, reference  # noqa: E402

SUITE = "grpo_loss"
MODES = ("forward", "backward", "full")
OPTIONS = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=1.0, loss_type="dapo")


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    V: int
    G: int  # group size: rewards of G consecutive rows form a group
    dtype: torch.dtype
    headline: bool = False  # run by --headline

    @property
    def name(self) -> str:
        return f"B={self.B} T={self.T} V={self.V} G={self.G} {str(self.dtype).replace('torch.', '')}"

    @property
    def floor_bytes(self) -> dict[str, int]:
        nvb = self.B * self.T * self.V * self.dtype.itemsize  # bytes of the logits
        return {"forward": nvb, "backward": nvb, "full": 2 * nvb}


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [Case(4, 7, 97, 2, torch.bfloat16, headline=True)]  # odd T, prime V: every masking path, seconds on CPU
    if device.type != "cuda":
        return [Case(4, 128, 32000, 4, torch.bfloat16)]  # N*V = 16M: minutes, not hours, on a CPU
    return [
        Case(8, 1024, 151936, 8, torch.bfloat16, headline=True),  # N = 8192, Qwen2.5 vocabulary: 2.5 GB of logits
        Case(8, 1024, 151936, 8, torch.float32),
        Case(16, 512, 32000, 8, torch.bfloat16),  # Llama-2-sized vocabulary
    ]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Logits (B, T, V) requiring grad, ids, and the GRPO companions around the current log-probs."""
    g = torch.Generator(device=device).manual_seed(seed)  # generated on the device: 1.2e9 values at N=8192
    logits = 2 * torch.randn(case.B, case.T, case.V, generator=g, device=device, dtype=case.dtype)  # (B, T, V)
    logits.requires_grad_(True)
    ids = torch.randint(0, case.V, (case.B, case.T), generator=g, device=device)
    with torch.no_grad():
        logps = chunked.selective_log_softmax(logits.detach(), ids, OPTIONS["temperature"])  # (B, T) fp32
    return {"logits": logits, "ids": ids, **common.grpo_companions(logps, case.G, seed)}


# Each provider maps (inputs, case, quick) to (loss_fn, wrt): a closure returning the scalar loss, and the
# tensors whose gradients backward produces. Peers raise common.Missing / common.Skipped.


class _Alias(torch.autograd.Function):
    """A non-leaf alias of the logits' storage, no copy: what a model's output is to an in-place loss (which
    refuses a leaf, and marks the buffer it consumes)."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _grpo_fast(inp, case, quick, inplace: bool = False, variant: str | None = None):
    options = OPTIONS | common.variant_kwargs(variant, inp)

    def loss_fn():
        logits = _Alias.apply(inp["logits"]) if inplace else inp["logits"]
        loss, _ = grpo_fast.grpo_loss(
            logits, inp["ids"], inp["completion_mask"], rewards=inp["rewards"], group_size=case.G,
            old_logps=inp["old_logps"], ref_logps=inp["ref_logps"], inplace_backward=inplace, **options,
        )  # fmt: skip
        return loss

    return loss_fn, [inp["logits"]]


def _reference_call(fn: Callable, inp) -> torch.Tensor:
    loss, _ = fn(
        inp["logits"], inp["ids"], inp["completion_mask"], advantages=inp["advantages"],
        old_logps=inp["old_logps"], ref_logps=inp["ref_logps"], **OPTIONS,
    )  # fmt: skip
    return loss


def _torch_eager(inp, case, quick):
    return (lambda: _reference_call(reference.grpo_loss, inp)), [inp["logits"]]


def _torch_compile(inp, case, quick):
    device = inp["ids"].device
    if quick:
        raise common.Skipped("not run in --quick: compiling takes longer than the whole smoke run")
    compiled = torch.compile(reference.grpo_loss)
    try:
        torch.autograd.grad(_reference_call(compiled, inp), [inp["logits"]])  # compile fwd + bwd now
    except Exception as e:
        if device.type == "cuda":
            raise
        raise common.Skipped(f"torch.compile failed on CPU: {type(e).__name__}: {e}") from e
    return (lambda: _reference_call(compiled, inp)), [inp["logits"]]


def _liger(inp, case, quick):
    device = inp["ids"].device
    triton_grpo_loss = common.import_peer("liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
    if device.type != "cuda":
        raise common.Skipped("Liger's Triton GRPO loss runs on CUDA only")
    # Liger scores logits[:, t] against ids[:, t] for t < T and drops a last position: (B, T + 1, V).
    logits = torch.cat([inp["logits"].detach(), inp["logits"].detach()[:, -1:]], 1).requires_grad_(True)
    mask = inp["completion_mask"]

    def loss_fn():
        per_token = triton_grpo_loss(
            logits, inp["old_logps"], inp["ref_logps"], inp["ids"], inp["advantages"], mask,
            temperature=OPTIONS["temperature"], beta=OPTIONS["beta"], eps_low=OPTIONS["epsilon"],
            eps_high=OPTIONS["epsilon_high"], inplace=True,
        )[0]  # fmt: skip
        return (per_token * mask).sum() / mask.sum().clamp(min=1)  # dapo

    return loss_fn, [logits]


def _trl(inp, case, quick):
    trl_sls = common.import_peer("trl.trainer.utils", "selective_log_softmax")

    def loss_fn():
        logps = trl_sls(inp["logits"], inp["ids"], OPTIONS["temperature"])  # (B, T)
        loss, _ = reference.grpo_loss_from_logps(
            logps.float(), inp["completion_mask"], inp["advantages"], old_logps=inp["old_logps"],
            ref_logps=inp["ref_logps"], **{k: v for k, v in OPTIONS.items() if k != "temperature"},
        )  # fmt: skip
        return loss

    return loss_fn, [inp["logits"]]


PROVIDERS: dict[str, Callable] = {
    "grpo_fast": _grpo_fast,
    "grpo_fast[inplace]": lambda inp, case, quick: _grpo_fast(inp, case, quick, inplace=True),
    "torch": _torch_eager,
    "torch.compile": _torch_compile,
    "liger": _liger,
    "trl": _trl,
}
PROVIDERS |= {
    f"grpo_fast[{v}]": (lambda inp, case, quick, v=v: _grpo_fast(inp, case, quick, variant=v)) for v in common.VARIANTS
}
HEADLINE = ("grpo_fast", "grpo_fast[inplace]", "torch", "torch.compile", "liger", "trl")  # providers, mode full


def bench_fn(provider: str, case: Case, mode: str, device: torch.device, quick: bool = False):
    """Fresh inputs (in-place providers overwrite their logits) and what to time for one cell."""
    loss_fn, wrt = PROVIDERS[provider](make_inputs(case, device), case, quick)
    return common.mode_fn(loss_fn, wrt, mode)


def _units(r: dict, case: Case, ceilings: dict) -> dict:
    if r["status"] != "ok":
        return r
    gbps = case.floor_bytes[r["mode"]] / (r["median_ms"] * 1e-3) / 1e9
    logits_mb = case.floor_bytes["forward"] / 1e6  # peak_mb against this: the logits-sized allocations
    return {**r, "gbps": gbps, "frac_copy": gbps / ceilings["copy_gbps"], "logits_mb": logits_mb}


def run(quick: bool, device: torch.device, ceilings: dict, select=common.EVERYTHING) -> list[dict]:
    """Every (selected) case x mode x provider as a row; see the module docstring for the units."""
    units = lambda r, case: _units(r, case, ceilings)
    modes, providers = select.pick(MODES, ("full",)), select.pick(PROVIDERS, HEADLINE)
    return common.run_grid(SUITE, select.cases(cases(quick, device)), modes, providers, bench_fn, units, device, quick)


# pytest-benchmark: `pytest bench/bench_grpo_loss.py --benchmark-only` (bench/ is not in CI's testpaths).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_grpo_loss(benchmark, provider, mode):
    device = common.default_device()
    case = cases(quick=device.type != "cuda", device=device)[0]
    try:
        fn = bench_fn(provider, case, mode, device, quick=device.type != "cuda")
    except (common.Missing, common.Skipped) as e:
        pytest.skip(str(e))
    benchmark.extra_info.update(case=case.name, floor_bytes=case.floor_bytes[mode])
    common.run_pytest_benchmark(benchmark, fn, device)


if __name__ == "__main__":
    common.main(SUITE, run)
