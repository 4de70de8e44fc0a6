"""Selective log-softmax over materialized logits: logp = log_softmax(logits / T)[ids], in Triton.

One program per row streams the V logits in BLOCK_V blocks with an online log-sum-exp, so no (N, V)
softmax is ever built. Forward reads N*V*b bytes and saves only the per-row lse (4 bytes a row);
backward reads the logits again and writes dlogits = g * (onehot - softmax(x / T)) / T once: 2*N*V*b.
The row helpers `_row_logsumexp` and `_row_softmax_grad` are shared with `grpo_loss.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_fast import inplace
from grpo_fast.backend import interpreted

from .logit_transform import head_constants, tanh_and_slope


@triton.jit
def _row_logsumexp(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Online log-sum-exp of x = row[:V] / T.

    Returns fp32 scalars (lse, E_softmax[x]); E[x] (for entropy = lse - E[x]) is 0 unless WITH_ENTROPY.
    """
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    u = 0.0
    for start in range(0, V, BLOCK_V):
        valid = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp  # (BLOCK_V,)
        x = tl.where(valid, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            u = u * alpha + tl.sum(e * tl.where(e > 0.0, x, 0.0), axis=0)  # no 0 * -inf on padded lanes
        m = m_new
    # s >= 1 whenever a column was read (the max adds exp(0)); 1 keeps skipped rows quiet. A NaN or +inf logit
    # makes s NaN (exp(inf - inf)), which must survive: the default maximum would return 1 and a finite lse.
    s = tl.maximum(s, 1.0, propagate_nan=tl.PropagateNan.ALL)
    return m + tl.log(s), u / s


@triton.jit
def _round_to_bf16(x, ROUND: tl.constexpr):
    """Round-to-nearest-even of fp32 `x` to bf16 precision when ROUND: the interpreter's fp32 -> bf16 cast
    truncates (a GPU's rounds to nearest), which would double the gradient's rounding error in tests."""
    if ROUND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _row_softmax_grad(
    dst_ptr, row_ptr, target, g, g_ent, ent, lse, inv_temp, V,
    BLOCK_V: tl.constexpr, ENT_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, post=1.0, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    """dst[:V] = (g * (onehot(target) - p) - g_ent * p * (log p + ent)) / T with p = softmax(row / T):
    the gradient of g * logp + g_ent * entropy (dH/dx_j = -p_j (log p_j + H)); g_ent only when ENT_GRAD.
    SOFTCAP (the fused linear backward's raw tile z, logit_transform.py): logits / T = post * tanh(inv_temp * z),
    and the gradient is taken to z: times inv_temp * post * (1 - tanh^2) instead of 1 / T.
    A row whose gradients are both 0 is not read, only zeroed. dst_ptr may equal row_ptr (in place): each
    block is loaded before it is overwritten."""
    live = g != 0.0
    if ENT_GRAD:
        live = live | (g_ent != 0.0)
    n_read = tl.where(live, V, 0)
    scale = g * inv_temp
    scale_ent = g_ent * inv_temp
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        valid = idx < V
        x = tl.load(row_ptr + idx, mask=idx < n_read, other=0.0).to(tl.float32)  # (BLOCK_V,)
        if SOFTCAP:
            t, slope = tanh_and_slope(x * inv_temp)
            log_p = post * t - lse
        else:
            log_p = x * inv_temp - lse
        p = tl.exp(log_p)
        d = scale * (tl.where(idx == target, 1.0, 0.0) - p)
        if ENT_GRAD:
            d -= scale_ent * tl.where(p > 0.0, p * (log_p + ent), 0.0)  # a -inf logit has p = 0: no 0 * -inf
        if SOFTCAP:
            d = d * (post * slope)
        d = tl.where(live, d, 0.0)
        tl.store(dst_ptr + idx, _round_to_bf16(d, ROUND_BF16).to(dst_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _fwd_kernel(
    logp_ptr,
    lse_ptr,
    ent_ptr,
    logits_ptr,
    ids_ptr,
    inv_temp,
    stride_n,
    V,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    lse, mean_x = _row_logsumexp(row_ptr, V, inv_temp, BLOCK_V, WITH_ENTROPY)
    target = tl.load(ids_ptr + row)
    x_t = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, x_t - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, lse - mean_x)


@triton.jit
def _bwd_kernel(
    dlogits_ptr,
    grad_ptr,
    grad_ent_ptr,
    logits_ptr,
    ids_ptr,
    lse_ptr,
    ent_ptr,
    inv_temp,
    stride_n,
    stride_dn,
    V,
    post,
    BLOCK_V: tl.constexpr,
    ENT_GRAD: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_ptr + row).to(tl.float32)
    target = tl.load(ids_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_ent = 0.0
    ent = 0.0
    if ENT_GRAD:
        g_ent = tl.load(grad_ent_ptr + row).to(tl.float32)
        ent = tl.load(ent_ptr + row)
    dst_ptr = dlogits_ptr + row * stride_dn
    _row_softmax_grad(
        dst_ptr, logits_ptr + row * stride_n, target, g, g_ent, ent, lse, inv_temp, V, BLOCK_V, ENT_GRAD, ROUND_BF16,
        post, SOFTCAP,
    )  # fmt: skip


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). GPU: up to 8192 columns a block (32 KB of fp32 in registers over 16 warps).
    Interpreter: a quarter of the padded row (several blocks even for tiny V), at most 4096."""
    padded = triton.next_power_of_2(V)
    if interpreted():
        return min(max(16, padded // 4), 4096), 1
    block = min(8192, padded)
    return block, 16 if block >= 8192 else (8 if block >= 2048 else 4)


def round_bf16(out: torch.Tensor) -> bool:
    return interpreted() and out.dtype == torch.bfloat16


def rows_2d(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V) with unit column stride (a view when the leading dims merge)."""
    logits2d = logits.reshape(-1, logits.shape[-1])
    return logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous()


def forward_rows(logits2d: torch.Tensor, ids1d: torch.Tensor, temperature: float, with_entropy: bool):
    """Per-row (logp, lse, entropy or None), fp32 (N,); reads the (N, V) logits once."""
    N, V = logits2d.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits2d.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else lse  # unused pointer when not asked
    if N:
        block, warps = launch_config(V)
        _fwd_kernel[(N,)](
            logp, lse, ent, logits2d, ids1d, 1.0 / temperature, logits2d.stride(0), V,
            BLOCK_V=block, WITH_ENTROPY=with_entropy, num_warps=warps,
        )  # fmt: skip
    return logp, lse, ent if with_entropy else None


def backward_rows(
    grad_logp,
    logits2d,
    ids1d,
    lse,
    temperature: float,
    inplace: bool,
    grad_ent=None,
    ent=None,
    head: tuple = (1.0, None),
) -> torch.Tensor:
    """dlogits (N, V) in the logits' dtype of sum(grad_logp * logp + grad_ent * entropy) (grad_ent and the
    forward's entropy `ent` (N,) fp32 only when the entropy is differentiated); into the logits buffer when
    `inplace`. head = (logit_scale, softcap): the rows hold z and the logits are f(z) (logit_transform.py); dz
    is written."""
    N, V = logits2d.shape
    dlogits = logits2d if inplace else torch.empty_like(logits2d)  # the only N*V allocation
    grad = grad_logp.reshape(-1).contiguous()
    ent_grad = grad_ent is not None
    if ent_grad:
        grad_ent, ent = grad_ent.reshape(-1).float().contiguous(), ent.contiguous()
    pre, post, softcap = head_constants(temperature, *head)
    if N:
        block, warps = launch_config(V)
        _bwd_kernel[(N,)](
            dlogits, grad, grad_ent if ent_grad else grad, logits2d, ids1d, lse, ent if ent_grad else lse,
            pre, logits2d.stride(0), dlogits.stride(0), V, post,
            BLOCK_V=block, ENT_GRAD=ent_grad, ROUND_BF16=round_bf16(dlogits), SOFTCAP=softcap, num_warps=warps,
        )  # fmt: skip
    return dlogits


class SelectiveLogSoftmax(torch.autograd.Function):
    """(N, V) logits, (N,) ids -> (logp (N,) fp32, entropy (N,) fp32 or empty). Both are differentiable:
    backward reads the logits once more and writes dlogits once, with the entropy's term when it has a gradient."""

    @staticmethod
    def forward(ctx, logits2d, ids1d, temperature: float, with_entropy: bool, inplace_backward: bool):
        ctx.set_materialize_grads(False)  # an entropy used only for metrics brings no gradient term
        logp, lse, ent = forward_rows(logits2d, ids1d, temperature, with_entropy)
        ent = ent if with_entropy else logp.new_empty(0)
        if inplace_backward:  # backward writes dlogits into the buffer; the caller marks it consumed
            inplace.hold(ctx, logits2d)
            ctx.save_for_backward(ids1d, lse, ent)
        else:
            ctx.save_for_backward(ids1d, lse, ent, logits2d)  # O(N) saved besides the logits themselves
        ctx.temperature, ctx.inplace = temperature, inplace_backward
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        ids1d, lse, ent, *rest = ctx.saved_tensors
        logits2d = inplace.held(ctx) if ctx.inplace else rest[0]
        grad_logp = lse.new_zeros(lse.shape) if grad_logp is None else grad_logp.float()
        dlogits = backward_rows(grad_logp, logits2d, ids1d, lse, ctx.temperature, ctx.inplace, grad_ent, ent)
        return dlogits, None, None, None, None


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at `ids`; inputs are validated by `grpo_fast.loss`.

    Args:
        logits: (..., V) bfloat16/float16/float32, CUDA (or CPU under TRITON_INTERPRET=1).
        ids: (...) int64/int32 in [0, V).
        temperature: positive float.
    Returns:
        logps (...) float32, differentiable; backward allocates one (..., V) gradient in the logits' dtype.
    """
    logits2d = rows_2d(logits)
    ids1d = ids.reshape(-1).contiguous()
    logp, _ = SelectiveLogSoftmax.apply(logits2d, ids1d, float(temperature), False, False)
    return logp.view(ids.shape)
