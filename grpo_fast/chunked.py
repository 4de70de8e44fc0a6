"""Memory-frugal torch path over materialized logits, used where no Triton kernel runs (plain CPU).

Rows of the (N, V) logits are processed in chunks, so the extra memory is O(chunk * V) plus O(N):
forward saves only the per-token log-sum-exp; backward recomputes softmax chunk by chunk and writes
the gradient straight into its (N, V) output (or into the logits buffer with `inplace_backward`).
"""

from __future__ import annotations

import torch

from . import inplace

CHUNK_ELEMENTS = 1 << 22  # 4M fp32 temporaries (16 MB) per chunk


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def logsumexp_entropy(logits2d: torch.Tensor, temperature: float, with_entropy: bool):
    """Per-row log-sum-exp of logits/temperature (N,), and the entropy (N,) when asked; fp32."""
    N, V = logits2d.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits2d.device)
    ent = torch.empty(N, dtype=torch.float32, device=logits2d.device) if with_entropy else None
    step = _chunk_rows(V)
    for s in range(0, N, step):
        x = logits2d[s : s + step].float() / temperature  # (n, V)
        m = torch.logsumexp(x, dim=-1)  # (n,)
        lse[s : s + step] = torch.where(torch.isposinf(m), float("nan"), m)  # a +inf logit: undefined, as in Triton
        if with_entropy:
            p = torch.softmax(x, dim=-1)
            ent[s : s + step] = lse[s : s + step] - (p * torch.where(p > 0, x, 0.0)).sum(-1)  # -inf logit: 0, not NaN
    return lse, ent


class ChunkedSelectiveLogSoftmax(torch.autograd.Function):
    """logp = logits[id] / T - lse (N,) and the entropy H (N,), both differentiable; backward writes
    dlogits = (g * (onehot - p) - g_H * p * (log p + H)) / T chunk by chunk (the entropy term only when it
    has a gradient: the entropy bonus)."""

    @staticmethod
    def forward(ctx, logits2d, ids1d, temperature, inplace_backward, with_entropy):
        ctx.set_materialize_grads(False)
        lse, ent = logsumexp_entropy(logits2d, temperature, with_entropy)
        target = logits2d.gather(1, ids1d.unsqueeze(1)).squeeze(1).float() / temperature
        ent = ent if with_entropy else lse.new_empty(0)
        if inplace_backward:  # backward writes dlogits into the buffer; the caller marks it consumed
            inplace.hold(ctx, logits2d)
            ctx.save_for_backward(ids1d, lse, ent)
        else:
            ctx.save_for_backward(ids1d, lse, ent, logits2d)
        ctx.temperature, ctx.inplace = temperature, inplace_backward
        return target - lse, ent  # (N,) fp32 each

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        ids1d, lse, ent, *rest = ctx.saved_tensors
        logits2d = inplace.held(ctx) if ctx.inplace else rest[0]
        T = ctx.temperature
        grad = logits2d if ctx.inplace else torch.empty_like(logits2d)  # (N, V): the only N*V tensor
        step = _chunk_rows(logits2d.shape[1])
        for s in range(0, logits2d.shape[0], step):
            log_p = logits2d[s : s + step].float() / T - lse[s : s + step].unsqueeze(1)  # (n, V)
            p = torch.exp(log_p)
            d = torch.zeros_like(p)
            if grad_logp is not None:  # rows without gradient (masked) may hold NaN: never read
                g = grad_logp[s : s + step].float().unsqueeze(1)  # (n, 1)
                d = torch.where(g != 0, -g * p, 0.0)
                d.scatter_add_(1, ids1d[s : s + step].unsqueeze(1), g)
            if grad_ent is not None:  # dH/dx_j = -p_j (log p_j + H); p = 0 (a -inf logit) adds nothing
                g_ent = grad_ent[s : s + step].float().unsqueeze(1)
                dent = torch.where(p > 0, p * (log_p + ent[s : s + step].unsqueeze(1)), 0.0)
                d -= torch.where(g_ent != 0, g_ent * dent, 0.0)
            grad[s : s + step] = (d / T).to(grad.dtype)
        return grad, None, None, None, None


def logps_entropy(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, inplace_backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked log_softmax(logits / T)[ids] and entropy, one read of the logits: (..., V), (...) -> (...) fp32 x 2."""
    V = logits.shape[-1]
    logits2d = logits.reshape(-1, V)
    logp, ent = ChunkedSelectiveLogSoftmax.apply(logits2d, ids.reshape(-1), float(temperature), inplace_backward, True)
    if inplace_backward:
        inplace.consume(logits2d)  # as on the kernel path: autograd sees that the buffer is taken
    return logp.view(ids.shape), ent.view(ids.shape)


def selective_log_softmax(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, inplace_backward: bool = False
) -> torch.Tensor:
    """Chunked log_softmax(logits / T)[ids]: (..., V), (...) -> (...) fp32."""
    V = logits.shape[-1]
    logits2d = logits.reshape(-1, V)
    out = ChunkedSelectiveLogSoftmax.apply(logits2d, ids.reshape(-1), float(temperature), inplace_backward, False)[0]
    if inplace_backward:
        inplace.consume(logits2d)  # as on the kernel path: autograd sees that the buffer is taken
    return out.view(ids.shape)
