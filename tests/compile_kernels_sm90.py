"""Ahead-of-time compile of every launched Triton kernel for an H100 (sm_90): PTX, then cubin by ptxas.

No GPU or driver is needed. Run as a script WITHOUT TRITON_INTERPRET (under the interpreter @triton.jit
builds no compilable kernels, and the launchers would pick their interpreter block sizes):

    env -u TRITON_INTERPRET python tests/compile_kernels_sm90.py [--full]

Each launcher runs on meta tensors (no memory, no device) with its kernel swapped for a recorder, so the
signature, constexprs and num_warps compiled here are exactly those the launcher passes on a GPU (its
non-interpreted branch: GPU block sizes, DOT_FP32/IEEE/ROUND_BF16 as on a GPU). Argument types follow
Triton's launch-time specialisation: tensors -> `*dtype` (16-byte aligned), ints -> i32/i64, an int equal
to 1 -> constexpr, ints divisible by 16 -> the divisibility hint, floats -> fp32.
The GRPO token kernel gets the training flag combinations plus enough more that every value pair of any
two flags is compiled together; `--full` compiles the whole flag product (about 1.5 min on 2 cores).
One line per compile; the last line is one JSON object (the kernels found and a row per compile).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import os
import pkgutil
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from grpo_fast import kernels as kernels_pkg
from grpo_fast.kernels import fused_linear_grpo as fl
from grpo_fast.kernels import grpo_loss as gl
from grpo_fast.kernels import selective_log_softmax as sls
from grpo_fast.reference import LossOptions

TARGET = GPUTarget("cuda", 90, 32)  # H100: sm_90, warp size 32
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}
DTYPES.update({torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"})
META = torch.device("meta")  # shapes and dtypes only: a (16, 16384, 151936) tensor costs nothing


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)` call and what it is an example of."""

    kernel: triton.JITFunction
    args: tuple
    kwargs: dict
    case: str = ""
    main: bool = False  # a configuration training runs all the time: must not spill registers
    tags: dict = field(default_factory=dict)


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: `rec[grid](...)` records the call, launches nothing."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(Launch(self.kernel, args, kwargs))


LAUNCHED = {sls: ("_fwd_kernel", "_bwd_kernel"), gl: ("_grpo_token_kernel",), fl: ("_fwd_kernel",)}


def record(fn, *args, case: str, main: bool = False, **kwargs) -> list[Launch]:
    """Runs a launcher `fn` with every launched kernel replaced by a recorder; returns the launches."""
    calls: list[Launch] = []
    saved = {(mod, name): getattr(mod, name) for mod, names in LAUNCHED.items() for name in names}
    try:
        for (mod, name), kernel in saved.items():
            setattr(mod, name, _Recorder(kernel, calls))
        fn(*args, **kwargs)
    finally:
        for (mod, name), kernel in saved.items():
            setattr(mod, name, kernel)
    for call in calls:
        call.case, call.main = case, main
    return calls


def _arg_type(value, specialize: bool):
    """(Triton type, divisible by 16) of a runtime argument, as the launcher's binder would specialise it."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False  # (Triton 3.6-3.9 spelling)
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), specialize and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def signature_of(launch: Launch, backend):
    """(signature, constexprs, attrs, options) of a recorded launch, keyed by the kernel's parameter names."""
    params = launch.kernel.params
    values = dict(zip([p.name for p in params], launch.args)) | launch.kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        value = values[p.name]
        kind, aligned = ("constexpr", False) if p.is_constexpr else _arg_type(value, not p.do_not_specialize)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = value
        if aligned:
            attrs[(i,)] = backend.parse_attr("D")  # tt.divisibility = 16
    options = {k: v for k, v in launch.kwargs.items() if k not in signature}  # num_warps, num_stages
    return signature, constexprs, attrs, options


def _ptxas_stats(log: str) -> dict:
    """Registers and spill bytes from ptxas -v (Triton prints its log under TRITON_DUMP_PTXAS_LOG=1)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "n_regs": int(regs.group(1)) if regs else None,
        "spill_bytes": (int(spills.group(1)) + int(spills.group(2))) if spills else None,
    }


def compile_launch(launch: Launch, backend) -> dict:
    """Compiles one launch for TARGET; a result row with the cubin size, registers, spills and shared memory."""
    signature, constexprs, attrs, options = signature_of(launch, backend)
    row = {"kernel": f"{launch.kernel.fn.__module__.rsplit('.', 1)[-1]}.{launch.kernel.__name__}", "case": launch.case}
    row.update(main=launch.main, tags=launch.tags, constexprs=constexprs, options=options)
    row["types"] = {k: v for k, v in signature.items() if v != "constexpr"}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(launch.kernel, signature, constexprs, attrs), target=TARGET, options=options
            )
    except Exception as e:  # every failure becomes a reported row
        return row | {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000] + "\n" + log.getvalue()[-2000:]}
    cubin = compiled.asm.get("cubin", b"")
    row.update(ok=len(cubin) > 0, cubin_bytes=len(cubin), shared=compiled.metadata.shared)
    row.update(num_warps=compiled.metadata.num_warps, **_ptxas_stats(log.getvalue()))
    return row


# ---- the launches: each launcher, on meta tensors shaped like real training inputs ----


def _t(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)


def selective_launches() -> list[Launch]:
    """Both kernels of selective_log_softmax.py, for every branch of `launch_config` (block 8192 with
    16 warps, 2048-4096 with 8, below 2048 with 4), a vocabulary that is not a multiple of 16, int32 ids."""
    out = []
    for dtype, V in itertools.product((torch.bfloat16, torch.float32), (151936, 50257, 3000, 1000)):
        main = V == 151936
        case = f"{DTYPES[dtype]} V={V}"
        logits, ids = _t(4096, V, dtype=dtype), _t(4096, dtype=torch.int64)
        out += record(sls.forward_rows, logits, ids, 0.7, False, case=case, main=main)
        out += record(sls.forward_rows, logits, ids, 1.0, True, case=case + " entropy", main=main)
        out += record(sls.backward_rows, _t(4096), logits, ids, _t(4096), 1.0, False, case=case, main=main)
        out += record(sls.backward_rows, _t(4096), logits, ids, _t(4096), 1.0, True, case=case + " inplace")
        out += record(
            sls.backward_rows, _t(4096), logits, ids, _t(4096), 1.0, False, _t(4096), _t(4096),
            case=case + " entropy gradient", main=main,
        )  # fmt: skip
    logits = _t(4096, 151936, dtype=torch.float16)
    ids = _t(4096, dtype=torch.int32)
    out += record(sls.forward_rows, logits, ids, 1.0, True, case="fp16 V=151936 int32 ids")
    out += record(sls.backward_rows, _t(4096), logits, ids, _t(4096), 1.0, False, case="fp16 V=151936 int32 ids")
    return out


GRPO_FLAGS = ("adv", "old", "ref", "beta", "delta", "grad", "kind", "bias_kl", "is", "bonus")
# adv: given | group | batch | none; kind: the surrogate (clip | cispo | sapo); is: vLLM ratios none | token | row
KINDS = {"clip": "dapo", "cispo": "cispo", "sapo": "sapo"}


def _pairs(flags: tuple) -> set:
    return set(itertools.combinations(enumerate(flags), 2))


def _grpo_flag_sets(full: bool) -> list[tuple]:
    """Flag tuples (GRPO_FLAGS order): the training combinations, then (greedily) more until every value
    pair of every two flags is covered; `full`: the whole product. beta != 0 needs ref_logps (checks.py)."""
    advs, bools = ("given", "group", "batch", "none"), (False, True)
    domains = (advs, bools, bools, bools, bools, bools, tuple(KINDS), bools, ("none", "token", "row"), bools)
    product = [f for f in itertools.product(*domains) if f[2] or not f[3]]
    if full:
        return product
    base = ("clip", False, "none", False)
    chosen = [  # TRL's defaults (beta 0, old = current), with KL, with old and delta, eval / old / ref passes
        ("group", False, False, False, False, True, *base),
        ("group", True, True, True, False, True, *base),
        ("group", True, True, True, True, True, *base),
        ("given", False, False, False, False, True, *base),
        ("group", False, False, False, False, False, *base),
        ("given", False, True, False, False, False, *base),
        ("given", True, True, True, False, True, "clip", True, "token", False),  # TRL 1.16's vLLM defaults
        ("given", True, False, False, False, True, "cispo", False, "none", False),  # CISPO
    ]
    todo = set().union(*map(_pairs, product)) - set().union(*map(_pairs, chosen))
    while todo:
        best = max(product, key=lambda f: len(_pairs(f) & todo))
        chosen.append(best)
        todo -= _pairs(best)
    return chosen


def _grpo_call(logits, ids, mask, flags: tuple):
    adv, old, ref, beta, delta, grad, kind, bias_kl, is_mode, bonus = flags
    B, T, _ = logits.shape
    kw = dict(old_logps=_t(B, T) if old else None, ref_logps=_t(B, T) if ref else None)
    kw.update(importance_sampling_ratio={"none": None, "token": _t(B, T), "row": _t(B, 1)}[is_mode])
    opts = LossOptions(loss_type=KINDS[kind], beta=0.04 if beta else 0.0, delta=2.0 if delta else None)
    opts = dataclasses.replace(opts, epsilon_high=0.28, use_bias_correction_kl=bias_kl, entropy_coef=0.01 * bonus)
    if adv == "given":
        kw.update(advantages=_t(B))
    else:
        kw.update(rewards=_t(B), group_size=8, scale_rewards=adv)
    with torch.set_grad_enabled(grad):
        gl.grpo_loss(logits.requires_grad_(grad), ids, mask, opts, **kw)


def grpo_launches(full: bool) -> list[Launch]:
    """The token kernel of grpo_loss.py over its flags, bf16 and fp32 logits; B = 2 prompts x G = 8.
    Also T*V >= 2**31 (64-bit strides), odd T and V (no 16-divisible strides), and GSPO's two kernels."""
    out = []
    for dtype, flags in itertools.product((torch.bfloat16, torch.float32), _grpo_flag_sets(full)):
        logits, ids, mask = _t(16, 1024, 151936, dtype=dtype), _t(16, 1024, dtype=torch.int64), _t(16, 1024)
        case = f"{DTYPES[dtype]} " + " ".join(f"{n}={v}" for n, v in zip(GRPO_FLAGS, flags))
        calls = record(_grpo_call, logits, ids, mask, flags, case=case, main=flags[5] and flags[0] == "group")
        for call in calls:
            call.tags = dict(zip(GRPO_FLAGS, flags))
        out += calls
    for dtype, (T, V) in itertools.product((torch.bfloat16, torch.float32), ((16384, 151936), (777, 50257))):
        flags = ("group", True, True, True, False, True, "clip", False, "none", False)
        logits, ids, mask = _t(16, T, V, dtype=dtype), _t(16, T, dtype=torch.int64), _t(16, T)
        out += record(_grpo_call, logits, ids, mask, flags, case=f"{DTYPES[dtype]} T={T} V={V} training")
        logits = _t(16, T, V, dtype=dtype, grad=True)
        out += record(_gspo_call, logits, ids, mask, case=f"{DTYPES[dtype]} T={T} V={V} sequence level")
    return out


def _gspo_call(logits, ids, mask):
    opts = LossOptions(importance_sampling_level="sequence", entropy_coef=0.01)  # two passes, entropy gradient
    loss, _ = gl.grpo_loss(logits, ids, mask, opts, rewards=_t(16), group_size=8)
    loss.backward()


def fused_linear_launches() -> list[Launch]:
    """The forward kernel of fused_linear_grpo.py (bias x entropy; H = 4096, and 896 as Qwen2.5-0.5B;
    an odd H and V; the softcap of Gemma 2/3) and the backward's `backward_rows` on a (C, Vc) tile as `_chunks`
    sizes it, with and without the softcap."""
    out = []
    for dtype, (H, V), bias, ent in itertools.product(
        (torch.bfloat16, torch.float32), ((4096, 151936), (896, 151936), (1000, 50257)), (False, True), (False, True)
    ):
        if H != 4096 and (bias or not ent):  # bias x entropy on the main shape only
            continue
        main = H % 16 == 0 and not bias  # H = 1000 spills (no 16-divisible strides): reported, not main
        hidden, weight = _t(8192, H, dtype=dtype, grad=True), _t(V, H, dtype=dtype)
        b = _t(V, dtype=dtype) if bias else None
        case = f"{DTYPES[dtype]} H={H} V={V} bias={bias} entropy={ent}"
        out += record(fl.linear_logps, hidden, weight, b, _t(8192, dtype=torch.int64), 1.0, ent, case=case, main=main)
    hidden, weight = _t(8192, 4096, dtype=torch.float16, grad=True), _t(151936, 4096, dtype=torch.float16)
    out += record(fl.linear_logps, hidden, weight, None, _t(8192, dtype=torch.int64), 1.0, True, case="fp16 H=4096")
    for dtype, ent in itertools.product((torch.bfloat16, torch.float32), (False, True)):  # Gemma 2/3: softcap
        hidden, weight = _t(8192, 4096, dtype=dtype, grad=True), _t(262144, 4096, dtype=dtype)
        case = f"{DTYPES[dtype]} H=4096 V=262144 softcap entropy={ent}"
        ids = _t(8192, dtype=torch.int64)
        out += record(fl.linear_logps, hidden, weight, None, ids, 1.0, ent, softcap=30.0, case=case, main=True)
    for dtype, V, head in itertools.product(
        (torch.bfloat16, torch.float32), (151936, 50257), ((1.0, None), (1.0, 30.0))
    ):
        C, vc = fl._chunks(8192, V, dtype.itemsize)
        tile, ids = _t(C, vc, dtype=dtype), _t(C, dtype=torch.int64)
        case = f"backward tile {DTYPES[dtype]} ({C}, {vc}) of V={V}" + (" softcap" if head[1] else "")
        out += record(sls.backward_rows, _t(C), tile, ids, _t(C), 1.0, True, head=head, case=case, main=True)
        ent = (_t(C), _t(C))  # the entropy bonus' gradient term
        out += record(
            sls.backward_rows, _t(C), tile, ids, _t(C), 1.0, True, *ent, head=head, case=case + " entropy", main=True
        )
    return out


def _dedupe(launches: list[Launch], backend) -> list[Launch]:
    """One launch per distinct compile (signature, constexprs, alignment, options); the cases it stands
    for are kept in its tags["also"], `main` if any of them is."""
    kept: dict = {}
    for launch in launches:
        key = (launch.kernel, repr(signature_of(launch, backend)))
        if key not in kept:
            kept[key] = launch
            continue
        first = kept[key]
        first.tags.setdefault("also", []).append(launch.case)
        first.main = first.main or launch.main
    return list(kept.values())


def compile_all(launches: list[Launch]) -> list[dict]:
    """Compiles each launch in a fresh, temporary Triton cache; prints one line per compile."""
    backend = make_backend(TARGET)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its log
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpo_fast_sm90_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        for launch in _dedupe(launches, backend):
            row = compile_launch(launch, backend)
            rows.append(row)
            stats = f"warps={row['options'].get('num_warps')} regs={row.get('n_regs')} spill={row.get('spill_bytes')}"
            status = "ok" if row["ok"] else "FAILED"
            print(f"{status:6} {row['kernel']:36} {row['case']:60} {stats} smem={row.get('shared')}", flush=True)
    return rows


def discover_kernels() -> list[str]:
    """Every `*_kernel` @triton.jit function defined in grpo_fast.kernels: each must appear in the results."""
    names = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                names.append(f"{info.name}.{name}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every GRPO token-kernel flag combination")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter builds no compilable kernels")
    rows = compile_all(selective_launches() + grpo_launches(args.full) + fused_linear_launches())
    summary = {"triton": triton.__version__, "target": f"sm_{TARGET.arch}", "kernels": discover_kernels()}
    print(json.dumps(summary | {"results": rows}))


if __name__ == "__main__":
    main()
