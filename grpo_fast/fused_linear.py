"""Fused linear GRPO loss: final hidden states -> log-probs -> loss, never materializing the logits.

Public: `fused_linear_logps` and `fused_linear_grpo_loss`. Each validates on the host, then runs the
Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1; `grpo_fast.kernels.fused_linear_grpo`) or the
chunked torch path below (plain CPU, and float64). The O(B*T) GRPO terms are `reference.py`'s, with
autograd over the (B, T) log-probs only.

Logit transforms (`grpo_fast.logit_head`): the logits are f(z) of z = hidden @ W^T + b, with
f(z) = softcap * tanh(logit_scale * z / softcap) (logit_scale * z without a softcap), as Granite, Cohere and
Gemma 2/3 form them; backward multiplies dlogits by f'(z).

Chunked torch path: tokens in chunks of n rows, vocabulary in chunks of v columns, an online
log-sum-exp (and entropy) across the vocabulary chunks. Its temporaries are a few (n, v) and (v, H)
fp32 tiles, CHUNK_ELEMENTS each (4 MB), plus O(N) per-token values: never O(N * V). Backward
recomputes the logit tiles from the saved per-token lse (2*N*H*V FLOPs) and adds dHidden (2*N*H*V)
and, only when the head requires grad, dWeight (2*N*H*V) into an fp32 (V, H) accumulator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import checks, reference
from .backend import use_triton
from .logit_head import LogitTransform

CHUNK_ELEMENTS = 1 << 20  # 1M fp32 elements (4 MB) per temporary tile
TOKEN_CHUNK = 1024  # rows per token chunk: its (n, H) fp32 dHidden accumulator is the other temporary


def _steps(N: int, V: int, H: int) -> tuple[int, int]:
    """Token chunk n and vocabulary chunk v so that (n, v) and (v, H) tiles hold CHUNK_ELEMENTS."""
    n = max(1, min(N, TOKEN_CHUNK))
    return n, max(1, min(V, CHUNK_ELEMENTS // max(n, H)))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _z_tile(h, weight, bias, v0: int, v1: int) -> torch.Tensor:
    """z = h @ weight[v0:v1].T + bias[v0:v1] in h's dtype: (n, H) -> (n, v)."""
    z = h @ weight[v0:v1].to(h.dtype).T  # (n, v)
    return z + bias[v0:v1].to(h.dtype) if bias is not None else z


def _target_z(h, weight, bias, ids) -> torch.Tensor:
    """z of each row's id: (n, H), (n,) -> (n,)."""
    z = (h * weight[ids].to(h.dtype)).sum(-1)
    return z + bias[ids].to(h.dtype) if bias is not None else z


def _lse_entropy(h, weight, bias, temperature: float, head: LogitTransform, vstep: int, with_entropy: bool):
    """Online log-sum-exp (n,) and entropy (n,) (or None) over vocabulary chunks."""
    m = h.new_full((h.shape[0],), float("-inf"))
    s, t = h.new_zeros(h.shape[0]), h.new_zeros(h.shape[0])  # sum exp(x - m), sum exp(x - m) * x
    for v0 in range(0, weight.shape[0], vstep):
        x = head(_z_tile(h, weight, bias, v0, v0 + vstep)) / temperature  # (n, v)
        m_new = torch.maximum(m, x.amax(-1))
        scale = torch.exp(m - m_new)
        e = torch.exp(x - m_new.unsqueeze(1))
        s = s * scale + e.sum(-1)
        if with_entropy:
            t = t * scale + (e * x).sum(-1)
        m = m_new
    lse = m + torch.log(s)
    return lse, (lse - t / s if with_entropy else None)


@torch.no_grad()
def chunked_logps(hidden2d, weight, bias, ids1d, temperature: float, with_entropy: bool, head: LogitTransform):
    """logp (N,), lse (N,) and entropy (N,) or None, chunked over tokens and vocabulary."""
    N, H = hidden2d.shape
    n, v = _steps(N, weight.shape[0], H)
    dtype = _compute_dtype(hidden2d)
    logp, lse = hidden2d.new_empty(N, dtype=dtype), hidden2d.new_empty(N, dtype=dtype)
    ent = hidden2d.new_empty(N, dtype=dtype) if with_entropy else None
    for s in range(0, N, n):
        h = hidden2d[s : s + n].to(dtype)  # (n, H)
        lse[s : s + n], e = _lse_entropy(h, weight, bias, temperature, head, v, with_entropy)
        logp[s : s + n] = head(_target_z(h, weight, bias, ids1d[s : s + n])) / temperature - lse[s : s + n]
        if with_entropy:
            ent[s : s + n] = e
    return logp, lse, ent


@torch.no_grad()
def chunked_backward(grad_logp, grad_ent, hidden2d, weight, bias, ids1d, lse, ent, temperature: float, needs, head):
    """dHidden, dWeight, dBias (each None unless in `needs`) of sum(grad_logp * logp + grad_ent * entropy)
    (grad_ent None unless the entropy is differentiated: the entropy bonus).

    With y = f(z) / T (z the raw tile, f the logit transform): dy = g * (onehot - p) - g_H * p * (log p + H),
    dz = dy * f'(z) / T; the onehot part is a gather/index_add, the rest is recomputed tile by tile.
    """
    N, H = hidden2d.shape
    n, v = _steps(N, weight.shape[0], H)
    dtype = _compute_dtype(hidden2d)
    dh = torch.empty_like(hidden2d) if needs[0] else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs[1] else None  # (V, H)
    db = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if needs[2] else None
    for s in range(0, N, n):
        g = hidden2d.new_zeros(min(n, N - s), dtype=dtype) if grad_logp is None else grad_logp[s : s + n].to(dtype)
        g = g / temperature  # (n,)
        g_ent = None if grad_ent is None else (grad_ent[s : s + n].to(dtype) / temperature).unsqueeze(1)  # (n, 1)
        live = (g != 0) if g_ent is None else (g != 0) | (g_ent[:, 0] != 0)
        live = live.unsqueeze(1)  # (n, 1): rows without gradient (masked padding) may hold NaN: never used
        h, ids = torch.where(live, hidden2d[s : s + n].to(dtype), 0.0), ids1d[s : s + n]  # (n, H), (n,)
        g_t = g * head.derivative(_target_z(h, weight, bias, ids)) if not head.identity else g  # onehot part
        dh_c = g_t.unsqueeze(1) * weight[ids].to(dtype) if needs[0] else None  # (n, H) fp32
        if needs[1]:
            dw.index_add_(0, ids, g_t.unsqueeze(1) * h)
        if needs[2]:
            db.index_add_(0, ids, g_t)
        for v0 in range(0, weight.shape[0], v):
            z = _z_tile(h, weight, bias, v0, v0 + v)  # (n, v)
            log_p = head(z) / temperature - lse[s : s + n].unsqueeze(1)  # log softmax
            p = torch.exp(log_p)
            d = torch.where(live, -g.unsqueeze(1) * p, 0.0)  # (n, v) dy, softmax part
            if g_ent is not None:  # dH/dy_j = -p_j (log p_j + H); p = 0 (a -inf logit) adds nothing
                d_ent = g_ent * torch.where(p > 0, p * (log_p + ent[s : s + n].unsqueeze(1)), 0.0)
                d = d - torch.where(live, d_ent, 0.0)
            if not head.identity:
                d = d * head.derivative(z)  # dz
            if needs[0]:
                dh_c += d @ weight[v0 : v0 + v].to(dtype)
            if needs[1]:
                dw[v0 : v0 + v] += d.T @ h
            if needs[2]:
                db[v0 : v0 + v] += d.sum(0)
        if needs[0]:
            dh[s : s + n] = torch.where(live, dh_c, 0.0).to(dh.dtype)  # a NaN head must not reach masked rows
    return dh, _cast(dw, weight.dtype), _cast(db, None if bias is None else bias.dtype)


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


class ChunkedLinearLogps(torch.autograd.Function):
    """logp = log_softmax(f(hidden @ W.T + b) / T)[ids] (N,) and the entropy (N,), both differentiable."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, ids1d, temperature, with_entropy, head):
        ctx.set_materialize_grads(False)  # an entropy used only for metrics brings no gradient term
        logp, lse, ent = chunked_logps(hidden2d, weight, bias, ids1d, temperature, with_entropy, head)
        ctx.head = head
        ent = ent if with_entropy else logp.new_empty(0)
        ctx.save_for_backward(hidden2d, weight, bias, ids1d, lse, ent)
        ctx.temperature = temperature
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden2d, weight, bias, ids1d, lse, ent = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        args = (hidden2d, weight, bias, ids1d, lse, ent, ctx.temperature, needs, ctx.head)
        dh, dw, db = chunked_backward(grad_logp, grad_entropy, *args)
        return dh, dw, db, None, None, None, None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _logps_entropy(hidden, weight, bias, ids, temperature: float, with_entropy: bool, head: LogitTransform):
    """Dispatch: (..., H) -> logp (...) fp32 (fp64 for fp64 inputs), entropy (...) or None."""
    H = hidden.shape[-1]
    h2, i1 = hidden.reshape(-1, H), ids.reshape(-1)
    if use_triton(hidden) and hidden.dtype != torch.float64:
        from grpo_fast.kernels.fused_linear_grpo import linear_logps as kernel

        logp, ent = kernel(h2, weight, bias, i1, float(temperature), with_entropy, **head.kwargs())
    elif _needs_grad(hidden, weight, bias):
        logp, ent = ChunkedLinearLogps.apply(h2, weight, bias, i1, float(temperature), with_entropy, head)
    else:  # no-grad fast path (old / reference log-probs): nothing saved
        logp, _, ent = chunked_logps(h2, weight, bias, i1, float(temperature), with_entropy, head)
    return logp.view(ids.shape), (ent.view(ids.shape) if with_entropy else None)


def fused_linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(f(hidden @ weight.T + bias) / temperature)[ids] without materializing the logits, where
    f(z) = softcap * tanh(logit_scale * z / softcap), or logit_scale * z when softcap is None.

    Args:
        hidden: (..., H) bf16/fp16(CUDA)/fp32/fp64; weight: (V, H) in hidden's dtype; bias: (V,) or None.
        ids: (...) int32/int64 in [0, V).
        logit_scale, softcap: the model's logit transform (finite, > 0; `grpo_fast.logit_head.logit_transform(model)`
            reads them: Granite 1 / logits_scaling, Cohere logit_scale, Gemma 2 final_logit_softcapping).
        return_entropy: also return the entropy (...) of each position's distribution, from the same sweep over
            the vocabulary (what an entropy quantile over many batches needs before any loss: the trainer's
            top_entropy_quantile).
    Returns:
        logps (...) fp32 (fp64 for fp64 inputs), differentiable to hidden, weight and bias (each only if
        it requires grad); with return_entropy, (logps, entropy), both differentiable. Under torch.no_grad
        (old / reference log-probs) nothing is saved.
    """
    checks.linear_head(hidden, weight, bias, ids, "ids")
    checks.positive_number(temperature, "temperature")
    head = LogitTransform(logit_scale, softcap)
    logps, entropy = _logps_entropy(hidden, weight, bias, ids, temperature, with_entropy=return_entropy, head=head)
    return (logps, entropy) if return_entropy else logps


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    scale_rewards: str = "group",
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_items_in_batch: float | torch.Tensor | None = None,
    entropy_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    logps_out: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of `grpo_fast.grpo_loss(f(hidden @ weight.T + bias), ...)` without the (B, T, V) logits,
    f(z) = softcap * tanh(logit_scale * z / softcap) (logit_scale * z when softcap is None; identity by default).

    Args:
        hidden: (B, T, H) final hidden states; `hidden[:, t]` scores `completion_ids[:, t]`.
        weight: (V, H) LM head (may be tied to the embeddings), hidden's dtype; bias: (V,) or None.
        logit_scale, softcap: the model's logit transform, as in `fused_linear_logps`.
        logps_out: a (B, T) float32 tensor that receives this forward's per-token log-probs, detached (0 where the
            mask is 0), at no extra pass: the trainer's old log-probs for later updates and its rollout check.
        completion_ids: (B, T) int; completion_mask: (B, T) {0, 1}.
        advantages, rewards, ..., entropy_gather, **options: as `grpo_fast.grpo_loss` (TRL's loss options:
            loss_type, beta, epsilon, epsilon_high, delta, importance_sampling_level, ..., entropy_coef).
    Passes over the hidden-state tiles: every option costs the same, one forward sweep (logp, lse and entropy
    per token: 2*N*H*V FLOPs) and one backward sweep that recomputes the tiles; the options' O(N) terms run
    in torch between them, and the entropy bonus' gradient joins the backward tiles without another GEMM.
    Returns:
        (loss, metrics): as `grpo_fast.grpo_loss`. Gradients reach hidden, and weight/bias only when they
        require grad.
    """
    checks.tensor(hidden, "hidden", ndim=3)
    checks.linear_head(hidden, weight, bias, completion_ids, "completion_ids")
    head = LogitTransform(logit_scale, softcap)
    B, T, _ = hidden.shape
    companions = dict(old_logps=old_logps, ref_logps=ref_logps, sampling_logps=sampling_logps)
    companions.update(importance_sampling_ratio=importance_sampling_ratio, num_items_in_batch=num_items_in_batch)
    opts = checks.grpo_batch(
        B, T, weight.shape[0], hidden.device, completion_ids, completion_mask, options, advantages=advantages,
        rewards=rewards, group_size=group_size, scale_rewards=scale_rewards, temperature=temperature, **companions,
    )  # fmt: skip
    if logps_out is not None:
        checks.tensor(logps_out, "logps_out", ndim=2)
        checks.shape(logps_out, "logps_out", (B, T))
        checks.floating(logps_out, "logps_out")
        checks.same_device("hidden", hidden, ("logps_out", logps_out))
    logps, entropy = _logps_entropy(hidden, weight, bias, completion_ids, temperature, with_entropy=True, head=head)
    if logps_out is not None:
        logps_out.copy_(torch.where(completion_mask.bool(), logps.detach(), 0.0))
    if advantages is None:
        advantages = reference.group_advantages(rewards.to(logps.dtype), group_size, scale_rewards)
    return reference.grpo_loss_from_logps(
        logps, completion_mask, advantages, entropy=entropy, entropy_gather=entropy_gather, **companions,
        **opts.asdict(),
    )  # fmt: skip
