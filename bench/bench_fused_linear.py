"""Benchmark: the GRPO loss from hidden states (B, T, H) and an LM head (V, H), forward / backward / full,
with a frozen head (LoRA: no dW) and a trainable one.

Providers, measured in the same run: grpo_fast.fused_linear_grpo_loss (logits never in memory),
grpo_fast.grpo_loss over materialized logits (hidden @ W^T first), the torch reference (materialized, fp32
log-softmax), a chunked torch version (token chunks under activation checkpointing), Liger-Kernel's
LigerFusedLinearGRPOLoss, and TRL's own fused log-prob head (trl.kernels.ChunkedLogProbFunction, what
GRPOTrainer 1.16 scores completions with: cuBLAS tiles folded by a Triton kernel, recomputed in backward) followed
by the torch loss. Every call runs old and reference log-probs, beta=0.04, dapo. grpo_fast[<variant>] adds one of
TRL's other options (common.VARIANTS); every option costs the same two sweeps over the tiles.

Shapes: N=8192, H in {1536, 4096}, V=151936 bf16 on CUDA; N=512, H=256, V=32000 on a CPU; tiny with --quick.
--headline (the device check): H=1536 and 4096 with a frozen head (LoRA), mode full, grpo_fast against the torch
versions, Liger and TRL's head.

Units: useful FLOPs are 2*N*H*V forward, 2*N*H*V for dHidden and 2*N*H*V for dW (trainable head only);
`flops` adds the 2*N*H*V of recomputed logits for providers that recompute them in backward (grpo_fast
fused, torch[chunked]). tflops = flops / median time; frac_matmul = tflops / the bf16 matmul rate measured
in this run; x_floor = median time / (useful FLOPs at that rate): the issue's target is x_floor <= 1.5.
Liger computes its gradients inside forward: compare providers on the `full` rows.

    python bench/bench_fused_linear.py [--quick]
    pytest bench/bench_fused_linear.py --benchmark-only
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
from torch.utils.checkpoint import checkpoint  # noqa: E402

import grpo_fast  # noqa: E402
from bench import common  # noqa: E402
from bench.common import VARIANTS  # noqa: E402
from grpo_fast import reference  # noqa: E402

SUITE = "fused_linear"
MODES = ("forward", "backward", "full")
OPTIONS = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=1.0, loss_type="dapo")
CHUNK_ELEMENTS = 1 << 26  # logits per chunk in torch[chunked]: 128 MB bf16 + 256 MB fp32 log-softmax
RECOMPUTES = {"grpo_fast", "torch[chunked]", "trl[fused_head]"}  # providers whose backward recomputes the logits
TRL_CHUNK = 32768  # vocabulary columns per tile: trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    V: int
    G: int  # group size of the rewards
    trainable: bool  # the head gets dW (full fine-tuning) or is frozen (LoRA)
    dtype: torch.dtype = torch.bfloat16

    @property
    def headline(self) -> bool:  # run by --headline: the LoRA memory recipe's frozen head
        return not self.trainable

    @property
    def name(self) -> str:
        head = "trainable" if self.trainable else "frozen"
        return f"N={self.B * self.T} H={self.H} V={self.V} {str(self.dtype).replace('torch.', '')} {head}"

    def useful_flops(self, mode: str) -> int:
        gemm = 2 * self.B * self.T * self.H * self.V  # one (N, H) x (H, V) product
        bwd = gemm * (2 if self.trainable else 1)  # dHidden, and dW when the head trains
        return {"forward": gemm, "backward": bwd, "full": gemm + bwd}[mode]

    def flops(self, mode: str, provider: str) -> int:
        recompute = 2 * self.B * self.T * self.H * self.V if provider in RECOMPUTES and mode != "forward" else 0
        return self.useful_flops(mode) + recompute


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [Case(4, 5, 24, 67, 2, trainable) for trainable in (False, True)]  # tiny, prime V
    if device.type != "cuda":
        return [Case(4, 128, 256, 32000, 4, trainable) for trainable in (False, True)]  # 4 GFLOP per GEMM
    return [Case(8, 1024, H, 151936, 8, trainable) for H in (1536, 4096) for trainable in (False, True)]


def chunked_torch_logps(hidden2d, weight, bias, ids1d, temperature: float) -> torch.Tensor:
    """log_softmax(hidden @ W^T + b)[ids] over token chunks; checkpointing keeps one chunk's logits alive."""
    step = max(1, CHUNK_ELEMENTS // weight.shape[0])
    parts = [
        checkpoint(_chunk_logps, hidden2d[s : s + step], weight, bias, ids1d[s : s + step], temperature,
                   use_reentrant=False)
        for s in range(0, hidden2d.shape[0], step)
    ]  # fmt: skip
    return torch.cat(parts)  # (N,) fp32


def _chunk_logps(h, weight, bias, ids, temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(h, weight, bias)  # (n, V)
    return reference.selective_log_softmax(logits.float(), ids, temperature)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """hidden (B, T, H) and weight (V, H) with unit-scale logits, ids, and the GRPO companions."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device, dtype=case.dtype)
    hidden = torch.randn(case.B, case.T, case.H, **kw).requires_grad_(True)  # (B, T, H)
    weight = (torch.randn(case.V, case.H, **kw) * case.H**-0.5).requires_grad_(case.trainable)  # (V, H)
    ids = torch.randint(0, case.V, (case.B, case.T), generator=g, device=device)
    with torch.no_grad():
        logps = chunked_torch_logps(hidden.view(-1, case.H), weight, None, ids.view(-1), OPTIONS["temperature"])
    companions = common.grpo_companions(logps.view(case.B, case.T), case.G, seed)
    return {"hidden": hidden, "weight": weight, "ids": ids, **companions}


def _wrt(inp) -> list[torch.Tensor]:
    return [inp["hidden"]] + ([inp["weight"]] if inp["weight"].requires_grad else [])


def _loss_from_logps(logps, inp) -> torch.Tensor:
    options = {k: v for k, v in OPTIONS.items() if k != "temperature"}
    loss, _ = reference.grpo_loss_from_logps(
        logps, inp["completion_mask"], inp["advantages"], old_logps=inp["old_logps"], ref_logps=inp["ref_logps"],
        **options,
    )  # fmt: skip
    return loss


# Each provider maps (inputs, case, quick) to a closure returning the scalar loss; peers raise common.Missing.


def _grpo_fast(inp, case, quick, variant: str | None = None):
    options = OPTIONS | common.variant_kwargs(variant, inp)

    def loss_fn():
        loss, _ = grpo_fast.fused_linear_grpo_loss(
            inp["hidden"], inp["weight"], inp["ids"], inp["completion_mask"], rewards=inp["rewards"],
            group_size=case.G, old_logps=inp["old_logps"], ref_logps=inp["ref_logps"], **options,
        )  # fmt: skip
        return loss

    return loss_fn


def _grpo_fast_logits(inp, case, quick):
    def loss_fn():
        logits = inp["hidden"] @ inp["weight"].T  # (B, T, V): materialized, as without fusion
        loss, _ = grpo_fast.grpo_loss(
            logits, inp["ids"], inp["completion_mask"], rewards=inp["rewards"], group_size=case.G,
            old_logps=inp["old_logps"], ref_logps=inp["ref_logps"], **OPTIONS,
        )  # fmt: skip
        return loss

    return loss_fn


def _torch(inp, case, quick):
    def loss_fn():
        logits = (inp["hidden"] @ inp["weight"].T).float()  # (B, T, V) fp32, as TRL upcasts
        return _loss_from_logps(reference.selective_log_softmax(logits, inp["ids"], OPTIONS["temperature"]), inp)

    return loss_fn


def _torch_chunked(inp, case, quick):
    def loss_fn():
        h2d, ids1d = inp["hidden"].view(-1, case.H), inp["ids"].view(-1)
        logps = chunked_torch_logps(h2d, inp["weight"], None, ids1d, OPTIONS["temperature"])
        return _loss_from_logps(logps.view(case.B, case.T), inp)

    return loss_fn


def _liger(inp, case, quick):
    liger_cls = common.import_peer("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    compiled = inp["hidden"].is_cuda and not quick  # its default torch.compile, except in smoke runs
    loss_mod = liger_cls(
        beta=OPTIONS["beta"], epsilon_low=OPTIONS["epsilon"], epsilon_high=OPTIONS["epsilon_high"],
        loss_type=OPTIONS["loss_type"], temperature=OPTIONS["temperature"], compiled=compiled, use_ref_model=True,
    )  # fmt: skip

    def loss_fn():
        loss, _ = loss_mod(
            inp["hidden"], inp["weight"], inp["ids"], inp["completion_mask"], inp["advantages"],
            ref_per_token_logps=inp["ref_logps"], old_per_token_logps=inp["old_logps"],
        )  # fmt: skip
        return loss

    return loss_fn


def _trl_fused_head(inp, case, quick):
    head = common.import_peer("trl.kernels", "ChunkedLogProbFunction")  # TRL >= 1.16

    def loss_fn():
        h2d, ids1d = inp["hidden"].view(-1, case.H), inp["ids"].view(-1)
        outputs = ("log_probs", "entropy")  # what GRPOTrainer asks of it (add_fused_lm_head)
        logps, _entropy, *_ = head.apply(h2d, inp["weight"], None, ids1d, OPTIONS["temperature"], TRL_CHUNK, None, 1.0,
                                         outputs)  # fmt: skip
        return _loss_from_logps(logps.view(case.B, case.T).float(), inp)

    return loss_fn


PROVIDERS: dict[str, Callable] = {
    "grpo_fast": _grpo_fast,
    "grpo_fast[logits]": _grpo_fast_logits,
    "torch": _torch,
    "torch[chunked]": _torch_chunked,
    "liger": _liger,
    "trl[fused_head]": _trl_fused_head,
}
PROVIDERS |= {f"grpo_fast[{v}]": (lambda inp, case, quick, v=v: _grpo_fast(inp, case, quick, v)) for v in VARIANTS}
RECOMPUTES |= {f"grpo_fast[{v}]" for v in VARIANTS}
HEADLINE = ("grpo_fast", "grpo_fast[logits]", "torch", "torch[chunked]", "liger", "trl[fused_head]")  # mode full


def bench_fn(provider: str, case: Case, mode: str, device: torch.device, quick: bool = False):
    """Fresh inputs and what to time for one cell."""
    inp = make_inputs(case, device)
    return common.mode_fn(PROVIDERS[provider](inp, case, quick), _wrt(inp), mode)


def _units(r: dict, case: Case, ceilings: dict) -> dict:
    if r["status"] != "ok":
        return r
    seconds = r["median_ms"] * 1e-3
    tflops = case.flops(r["mode"], r["provider"]) / seconds / 1e12
    floor_s = case.useful_flops(r["mode"]) / (ceilings["matmul_tflops"] * 1e12)
    return {**r, "tflops": tflops, "frac_matmul": tflops / ceilings["matmul_tflops"], "x_floor": seconds / floor_s}


def run(quick: bool, device: torch.device, ceilings: dict, select=common.EVERYTHING) -> list[dict]:
    """Every (selected) case x mode x provider as a row; see the module docstring for the units."""
    units = lambda r, case: _units(r, case, ceilings)
    modes, providers = select.pick(MODES, ("full",)), select.pick(PROVIDERS, HEADLINE)
    return common.run_grid(SUITE, select.cases(cases(quick, device)), modes, providers, bench_fn, units, device, quick)


# pytest-benchmark: `pytest bench/bench_fused_linear.py --benchmark-only` (bench/ is not in CI's testpaths).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fused_linear(benchmark, provider, trainable, mode):
    device = common.default_device()
    case = next(c for c in cases(device.type != "cuda", device) if c.trainable == trainable)
    try:
        fn = bench_fn(provider, case, mode, device, quick=device.type != "cuda")
    except (common.Missing, common.Skipped) as e:
        pytest.skip(str(e))
    benchmark.extra_info.update(case=case.name, flops=case.flops(mode, provider))
    common.run_pytest_benchmark(benchmark, fn, device)


if __name__ == "__main__":
    common.main(SUITE, run)
