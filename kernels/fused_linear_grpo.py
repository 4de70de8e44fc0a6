"""Fused linear log-probs: hidden (N, H) @ weight (V, H)^T -> log_softmax(. / T)[ids] (N,), entropy (N,),
and their backward, never holding the (N, V) logits.

Forward (Triton): one program per BLOCK_N tokens computes the logit tiles on chip (tl.dot over H),
an online log-sum-exp, the target logit and the entropy across the vocabulary; 2*N*H*V FLOPs, writes
3*N fp32 (logp, lse, entropy). On a GPU the tiles enter tl.dot in bf16 (fp32 accumulate); fp32 inputs
use IEEE fp32 dots; under the interpreter (bf16 kept as raw bits) every tile is cast to fp32 (DOT_FP32).

Backward (cuBLAS + Triton), over (C, Vc) tiles of the tokens whose gradient is nonzero (GRPO: padding
and, at beta = 0, equal-reward groups drop out) x the vocabulary (`_chunks`):
  logits   = hidden_c @ W_v^T (+ b_v)          2*C*Vc*H, the inputs' dtype (bf16 tensor cores)
  dlogits  = backward_rows(...) in place        g * (onehot - p) / T (+ the entropy term), memory-bound
  dH_c    += dlogits @ W_v                      2*C*Vc*H into an fp32 (C, H) accumulator
  dW_v    += dlogits^T @ hidden_c, db_v += ...  2*C*Vc*H into fp32 (V, H), only for a trainable head
FLOPs: forward 2*N*H*V; backward 4*N*H*V for a frozen head (LoRA: the dW GEMM never runs), 6*N*H*V
for a trainable one. Bytes beyond the GEMM operands: ~5 passes over each 32 MB tile and the fp32
accumulators' read + write in the GEMM epilogues (see `_chunks`). The first version accumulated an fp32
(N, H) dHidden in global memory once per 128-wide vocabulary tile: N*H*8*V/128 = 318 GB at N=8192,
H=4096, V=151936; this one moves ~10-15 GB of tiles and accumulators there.
Extra memory: O(N) per-token values, one (C, Vc) tile (TILE_BYTES = 32 MB), the gathered (C, H) hidden
rows (8 MB in bf16 at H=4096) and the fp32 (C, H) dHidden accumulator (16 MB): independent of N and V.
A trainable head adds the fp32 (V, H) dWeight accumulator, cast to the weight's dtype at the end.

Logit transforms (`grpo_fast.logit_head`: Granite's, Cohere's scale, Gemma's softcap): the logits are
f(z) = softcap * tanh(logit_scale * z / softcap) (logit_scale * z without a softcap) of z = hidden @ W^T + b.
A scale alone folds into the temperature; the softcap is the SOFTCAP constexpr of the forward tile and of
`backward_rows`, which multiplies dlogits by f'(z) on the recomputed tile (logit_transform.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from grpo_fast.backend import interpreted

from .logit_transform import head_constants, transform
from .selective_log_softmax import backward_rows

TILE_BYTES = 32 << 20  # the backward's (C, Vc) logit tile in the inputs' dtype
TOKEN_CHUNK = 1024  # C: rows per backward tile; its fp32 (C, H) dHidden accumulator is C*H*4 bytes
# At H=4096, bf16: tile 32 MB + hidden rows 8 MB + accumulator 16 MB = 56 MB, inside the 64 MB budget;
# M=1024 keeps each GEMM compute-bound (1024*Vc*H*2 FLOPs per (1024 + Vc)*H*2 bytes of operands).


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, pre, post, stride_hn, stride_wv, N, V, H,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """logits / T of z = hidden[rows] @ weight[cols]^T + bias[cols] (logit_transform.py) as an fp32
    (BLOCK_N, BLOCK_V) tile; -inf past V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        h = tl.load(
            h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0
        )
        acc = _dot(h, tl.trans(w), acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < V, transform(acc, pre, post, SOFTCAP), float("-inf"))


@triton.jit
def _fwd_kernel(
    logp_ptr, lse_ptr, ent_ptr,
    h_ptr, w_ptr, b_ptr, ids_ptr,
    pre, post,
    stride_hn, stride_wv,
    N, V, H,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_N tokens: online log-sum-exp, target logit and entropy across vocab tiles."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + rows, mask=rows < N, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(x - m)
    t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(x - m) * x, for the entropy lse - t / s
    target = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x = _logit_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, pre, post, stride_hn, stride_wv, N, V, H,
            HAS_BIAS, SOFTCAP, DOT_FP32, IEEE, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(x, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])  # 0 past V
        s = s * scale + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            t = t * scale + tl.sum(e * tl.where(cols[None, :] < V, x, 0.0), axis=1)  # 0 * -inf is NaN
        target += tl.sum(tl.where(cols[None, :] == ids[:, None], x, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(logp_ptr + rows, target - lse, mask=rows < N)
    tl.store(lse_ptr + rows, lse, mask=rows < N)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, lse - t / s, mask=rows < N)


def _config(hidden: torch.Tensor, V: int) -> dict:
    """Tile sizes and dot flags. Interpreter: fp32 dots, and wide vocabulary tiles for a large V
    (its cost is per program and loop step, not per element)."""
    fp32 = interpreted() or hidden.dtype == torch.float32
    if interpreted():
        return dict(DOT_FP32=True, IEEE=True, BLOCK_N=16, BLOCK_V=64 if V < 8192 else 2048, BLOCK_H=64)
    # 8 warps: the (64, 128) fp32 accumulator plus the online-lse temporaries fit without spills (4 warps: 255 regs)
    return dict(DOT_FP32=fp32, IEEE=fp32, BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)


def _forward(hidden, weight, bias, ids, temperature: float, with_entropy: bool, head: tuple):
    """logp (N,), lse (N,), entropy (N,) fp32 (entropy None unless asked); head = (logit_scale, softcap)."""
    N, H = hidden.shape
    logp, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(2))
    ent = torch.empty(N, dtype=torch.float32, device=hidden.device) if with_entropy else logp
    pre, post, softcap = head_constants(temperature, *head)
    cfg = _config(hidden, weight.shape[0])
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    b = bias if bias is not None else weight  # unused pointer when HAS_BIAS is False
    if N:  # an empty launch grid is an error on some backends
        _fwd_kernel[grid](
            logp, lse, ent, hidden, weight, b, ids, pre, post, hidden.stride(0), weight.stride(0),
            N, weight.shape[0], H,
            HAS_BIAS=bias is not None, SOFTCAP=softcap, WITH_ENTROPY=with_entropy, **cfg,
        )  # fmt: skip
    return logp, lse, (ent if with_entropy else None)


def _chunks(N: int, V: int, elem_size: int) -> tuple[int, int]:
    """Token chunk C and vocabulary chunk Vc of the backward: the (C, Vc) logit tile holds TILE_BYTES.

    N=8192, V=151936, H=4096, bf16: C=1024, Vc=16384 (8 x 10 tiles). Per tile each GEMM does
    2*C*Vc*H = 137 GFLOP (~0.2 ms at 700 TFLOP/s) while the tile's elementwise traffic (GEMM write,
    backward_rows read + write, one read per gradient GEMM) is 4-5 x 32 MB (~45 us at 3.35 TB/s), and
    the fp32 accumulators cost 8 bytes an element in the GEMM epilogue: C*H*8 for dHidden (32 MB),
    Vc*H*8 for dWeight (512 MB, ~150 us, overlapped). C and Vc both in the thousands keep every GEMM
    compute-bound; a (C, V) row-chunk of 32 MB would give C = 64 and re-read the 1.24 GB head per 64 tokens.
    """
    C = max(1, min(N, TOKEN_CHUNK))
    vc = max(16, TILE_BYTES // (C * elem_size))
    return C, min(V, 1 << (vc.bit_length() - 1))  # a power of 2 keeps chunk starts aligned


@functools.cache
def _fp32_out_gemm(device: torch.device) -> bool:
    """Whether cuBLAS adds a bf16 @ bf16 product into an fp32 tensor in place here (addmm's out_dtype;
    some torch versions lack it or require `input` in the operands' dtype)."""
    a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
    acc = torch.ones(2, 2, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        return False
    return bool((acc == 3).all())


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with a, b in the inputs' dtype: fp32 accumulation, one rounding at the end."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _fp32_out_gemm(a.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # the epilogue reads and writes acc: no temporary
    elif a.is_cuda:
        acc += a @ b  # fallback: the partial product is rounded to the inputs' dtype once
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # CPU (interpreter tests): no mixed-dtype GEMM


def _accumulate_head_grads(dw, db, d, h, v0: int, v1: int) -> None:
    """dWeight[v0:v1] += d^T @ h (Vc, H) and dBias[v0:v1] += sum_rows(d), fp32; only for a trainable head."""
    if dw is not None:
        _add_matmul(dw[v0:v1], d.T, h)
    if db is not None:
        db[v0:v1] += d.sum(0, dtype=torch.float32)


def _backward(grad_logp, grad_ent, hidden, weight, bias, ids, lse, ent, temperature: float, needs: tuple, head):
    """dHidden, dWeight, dBias (None where not needed) of sum(grad_logp * logp + grad_ent * entropy), tile by
    tile (grad_ent None unless the entropy is differentiated: the entropy bonus); head = (logit_scale, softcap).

    Only tokens with a nonzero gradient enter the tiles (exact: the others' dlogits are 0); in GRPO
    these skip masked padding and, with beta = 0 and no entropy bonus, every row of a group whose rewards are
    all equal.
    Per (C, Vc) tile: logits = hidden_c @ W_v^T (+ b_v) (cuBLAS, the inputs' dtype), dlogits in place by
    `backward_rows` (ids shifted by v0: a target outside the tile adds no one-hot there), then
    dHidden_c += dlogits @ W_v and, for a trainable head, dWeight_v += dlogits^T @ hidden_c.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    g = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
    g_ent = None if grad_ent is None else grad_ent.float().contiguous()
    live = (g != 0) if g_ent is None else (g != 0) | (g_ent != 0)
    live = live.nonzero().squeeze(1)  # (N_live,) one host sync
    C, vc = _chunks(live.numel(), V, hidden.element_size())
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros_like(hidden) if needs[0] else None
    dw = torch.zeros(V, H, **f32) if needs[1] else None  # V*H*4 bytes, only for a trainable head
    db = torch.zeros(V, **f32) if needs[2] and bias is not None else None
    for rows in live.split(C):
        h, g_c, ids_c, lse_c = hidden[rows], g[rows], ids[rows], lse[rows]  # (C, H), (C,) x 3
        ent_c = () if g_ent is None else (g_ent[rows], ent[rows])  # the entropy term's (C,) x 2
        dh_c = torch.zeros(rows.numel(), H, **f32) if needs[0] else None  # (C, H)
        for v0 in range(0, V, vc):
            w = weight[v0 : v0 + vc]  # (Vc, H)
            x = h @ w.T if bias is None else torch.addmm(bias[v0 : v0 + vc], h, w.T)  # (C, Vc)
            d = backward_rows(g_c, x, ids_c - v0, lse_c, temperature, True, *ent_c, head=head)
            if dh_c is not None:
                _add_matmul(dh_c, d, w)
            _accumulate_head_grads(dw, db, d, h, v0, v0 + vc)
        if dh is not None:
            dh.index_copy_(0, rows, dh_c.to(dh.dtype))
    return dh, _cast(dw, weight.dtype), _cast(db, None if bias is None else bias.dtype)


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


class FusedLinearLogps(torch.autograd.Function):
    """(N, H), (V, H), (V,) or None, (N,) -> logp (N,) fp32 and entropy (N,) fp32 (or empty), both
    differentiable: the entropy's gradient term joins the same backward tiles (no extra GEMM)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, with_entropy, head):
        ctx.set_materialize_grads(False)  # an entropy used only for metrics brings no gradient term
        logp, lse, ent = _forward(hidden, weight, bias, ids, temperature, with_entropy, head)
        ctx.head = head
        ent = ent if with_entropy else logp.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ent)  # O(N) saved beyond the inputs
        ctx.temperature = temperature
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dh, dw, db = _backward(
            grad_logp, grad_entropy, hidden, weight, bias, ids, lse, ent, ctx.temperature, needs, ctx.head
        )
        return dh, dw, db, None, None, None, None


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(f(hidden @ weight.T + bias) / T)[ids] and the entropy, without the logits;
    f(z) = softcap * tanh(logit_scale * z / softcap), or logit_scale * z without a softcap.

    Args (validated by `grpo_fast.fused_linear`): hidden (N, H) bf16/fp16/fp32; weight (V, H) in
    hidden's dtype; bias (V,) or None; ids (N,) int32/int64 in [0, V); logit_scale > 0; softcap > 0 or None.
    Returns:
        logp (N,) fp32 and entropy (N,) fp32 (None unless `with_entropy`), differentiable to hidden/weight/bias
        (each only if it requires grad; no-grad calls save nothing).
    """
    hidden, weight, ids = hidden.contiguous(), weight.contiguous(), ids.contiguous()
    bias = bias.contiguous() if bias is not None else None
    head = (float(logit_scale), None if softcap is None else float(softcap))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        logp, ent = FusedLinearLogps.apply(hidden, weight, bias, ids, float(temperature), with_entropy, head)
        return logp, (ent if with_entropy else None)
    logp, _, ent = _forward(hidden, weight, bias, ids, float(temperature), with_entropy, head)
    return logp, ent
