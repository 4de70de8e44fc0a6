"""GRPO loss over materialized logits (B, T, V) in Triton, TRL's GRPOTrainer math (DESIGN.md).

Token level, training: ONE launch from rewards (or advantages) to the per-token loss AND dlogits. Each
program owns one token row: a prologue computes its row's group advantage from the group's G rewards,
loop 1 streams the row's V logits once (online log-sum-exp, entropy, target logit), the O(1) GRPO
terms give the loss and d loss / d logp, and loop 2 streams the row again (from L2 on a GPU, mostly)
to write dlogits = w_row * m * dloss/dlogp * (onehot - softmax) / T. The reduction's weight w_row is
known from the mask alone, so nothing waits for the scalar loss. Bytes: reads N*V*b, writes N*V*b
(2*N*V*b, the floor; a separate forward and backward costs 3*N*V*b); masked tokens and rows with a
zero gradient (A = 0, no KL) are not read at all. Nothing N*V is allocated besides the gradient, and
with `inplace_backward` not even that.
Sequence level (GSPO) needs each row's mean log-ratio first: pass 1 is the selective log-softmax
forward (with entropy), the O(N) terms run in torch (`reference.grpo_loss_from_logps`), pass 2 is
its backward kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grpo_fast import inplace, reference

from .selective_log_softmax import (
    SelectiveLogSoftmax,
    _row_logsumexp,
    _row_softmax_grad,
    launch_config,
    round_bf16,
    rows_2d,
)

ADV_GIVEN, ADV_GROUP, ADV_BATCH, ADV_NONE = 0, 1, 2, 3
ADV_MODES = {"group": ADV_GROUP, "batch": ADV_BATCH, "none": ADV_NONE}
METRICS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean")


@triton.jit
def _advantage(adv_ptr, rewards_ptr, b, B, G, reward_eps, ADV_MODE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row b's advantage: given (ADV_GIVEN), or (r_b - mean of its group of G) / (std + eps) with the
    unbiased std of the group (ADV_GROUP) or of all B rows (ADV_BATCH), or not divided (ADV_NONE)."""
    if ADV_MODE == 0:  # ADV_GIVEN
        a = tl.load(adv_ptr + b).to(tl.float32)
    else:
        g0 = (b // G) * G
        offs = tl.arange(0, BLOCK_R)
        if ADV_MODE == 2:  # ADV_BATCH
            r = tl.load(rewards_ptr + offs, mask=offs < B, other=0.0).to(tl.float32)  # (BLOCK_R,) every row
            in_group = (offs >= g0) & (offs < g0 + G)
        else:
            r = tl.load(rewards_ptr + g0 + offs, mask=offs < G, other=0.0).to(tl.float32)  # (BLOCK_R,) the group
            in_group = offs < G
        mean = tl.sum(tl.where(in_group, r, 0.0), axis=0) / G
        a = tl.load(rewards_ptr + b).to(tl.float32) - mean
        if ADV_MODE == 1:  # ADV_GROUP
            var = tl.sum(tl.where(in_group, (r - mean) * (r - mean), 0.0), axis=0) / tl.maximum(G - 1, 1)
            a = a / (tl.sqrt(var) + reward_eps)
        if ADV_MODE == 2:
            mean_all = tl.sum(r, axis=0) / B
            var = tl.sum(tl.where(offs < B, (r - mean_all) * (r - mean_all), 0.0), axis=0) / tl.maximum(B - 1, 1)
            a = a / (tl.sqrt(var) + reward_eps)
    return a


@triton.jit
def _grpo_terms(
    logp, old, ref, adv, beta, clip_low, clip_high, delta,
    HAS_REF: tl.constexpr, USE_BETA: tl.constexpr, HAS_DELTA: tl.constexpr,
):  # fmt: skip
    """One token's (loss, d loss / d logp, ratio, kl, clip code = low + 2 * high), as the reference:
    coef_2 clamps the ratio before delta caps coef_1; torch.min's tie splits its gradient in halves.
    min/max propagate NaN as torch's do (the default drops it: -min(NaN, t2) would give a finite -t2)."""
    c1_raw = tl.exp(logp - old)
    c2 = tl.minimum(
        tl.maximum(c1_raw, clip_low, propagate_nan=tl.PropagateNan.ALL), clip_high, propagate_nan=tl.PropagateNan.ALL
    )
    d2 = tl.where((c1_raw < clip_low) | (c1_raw > clip_high), 0.0, c1_raw)  # d coef_2 / d logp (NaN stays NaN)
    c1 = c1_raw
    d1 = c1_raw
    if HAS_DELTA:
        c1 = tl.minimum(c1_raw, delta, propagate_nan=tl.PropagateNan.ALL)
        d1 = tl.where(c1_raw > delta, 0.0, c1_raw)
    t1 = c1 * adv
    t2 = c2 * adv
    loss = -tl.minimum(t1, t2, propagate_nan=tl.PropagateNan.ALL)
    dlogp = -adv * tl.where(t1 < t2, d1, tl.where(t2 < t1, d2, 0.5 * (d1 + d2)))
    kl = tl.zeros_like(logp)  # a tensor, not a constexpr, in the returned tuple
    if HAS_REF:
        diff = ref - logp
        kl = tl.exp(diff) - diff - 1.0  # k3 estimator
        if USE_BETA:
            loss += beta * kl
            dlogp += beta * (1.0 - tl.exp(diff))
    code = ((c1 < clip_low) & (adv < 0.0)).to(tl.int8) + 2 * ((c1 > clip_high) & (adv > 0.0)).to(tl.int8)
    return loss, dlogp, c1, kl, code


@triton.jit
def _grpo_token_kernel(
    dlogits_ptr, loss_ptr, ent_ptr, ratio_ptr, kl_ptr, code_ptr,  # outputs: (B, T, V), then (B*T,) each
    logits_ptr, ids_ptr, mask_ptr, adv_ptr, rewards_ptr, weight_ptr, old_ptr, ref_ptr,  # inputs
    inv_temp, beta, clip_low, clip_high, delta, reward_eps,  # scalars
    stride_lb, stride_lt, stride_db, stride_dt,  # strides (columns are contiguous)
    B, T, V, G,  # shapes
    ADV_MODE: tl.constexpr, BLOCK_R: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    USE_BETA: tl.constexpr, HAS_DELTA: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    active = tl.load(mask_ptr + tok) != 0.0
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    lse = 0.0
    mean_x = 0.0
    if active:  # a masked row is not read (a branch, not a data-dependent loop bound: portable to older interpreters)
        lse, mean_x = _row_logsumexp(row_ptr, V, inv_temp, BLOCK_V, True)  # loop 1
    target = tl.load(ids_ptr + tok)
    logp = tl.load(row_ptr + target, mask=active, other=0.0).to(tl.float32) * inv_temp - lse
    old = logp  # old_logps = logp.detach(): ratio 1
    if HAS_OLD:
        old = tl.load(old_ptr + tok).to(tl.float32)
    ref = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + tok).to(tl.float32)
    adv = _advantage(adv_ptr, rewards_ptr, b, B, G, reward_eps, ADV_MODE, BLOCK_R)
    loss, dlogp, ratio, kl, code = _grpo_terms(
        logp, old, ref, adv, beta, clip_low, clip_high, delta, HAS_REF, USE_BETA, HAS_DELTA
    )
    tl.store(loss_ptr + tok, tl.where(active, loss, 0.0))  # masked tokens: finite zeros
    tl.store(ent_ptr + tok, tl.where(active, lse - mean_x, 0.0))
    tl.store(ratio_ptr + tok, tl.where(active, ratio, 0.0))
    tl.store(code_ptr + tok, tl.where(active, code, 0).to(tl.int8))
    if HAS_REF:
        tl.store(kl_ptr + tok, tl.where(active, kl, 0.0))
    if COMPUTE_GRAD:  # loop 2
        g = tl.where(active, tl.load(weight_ptr + b) * dlogp, 0.0)
        dst = dlogits_ptr + b * stride_db + t * stride_dt
        _row_softmax_grad(dst, row_ptr, target, g, lse, inv_temp, V, BLOCK_V, ROUND_BF16)


@dataclass
class _Batch:
    """The validated per-row and per-token companions of the logits, ready for the kernel."""

    ids: torch.Tensor  # (B, T) int, contiguous
    mask: torch.Tensor  # (B, T) fp32 {0, 1}
    advantages: torch.Tensor | None  # (B,)
    rewards: torch.Tensor | None  # (B,)
    old_logps: torch.Tensor | None  # (B, T)
    ref_logps: torch.Tensor | None  # (B, T)


@dataclass
class _Options:
    temperature: float
    beta: float
    epsilon: float
    epsilon_high: float | None
    delta: float | None
    loss_type: str
    max_completion_length: int | None
    num_items_in_batch: float | torch.Tensor | None
    group_size: int | None
    scale_rewards: str
    inplace_backward: bool


def _row_weights(mask: torch.Tensor, opts: _Options) -> torch.Tensor:
    """(B,) fp32: d loss / d per-token loss of an active token in row b, by loss_type (reference.reduce_loss)."""
    B, T = mask.shape
    if opts.loss_type == "grpo":
        return 1.0 / (B * mask.sum(-1).clamp(min=1.0))
    if opts.loss_type == "bnpo":
        denom = mask.sum().clamp(min=1.0)
    elif opts.loss_type == "dr_grpo":
        denom = torch.tensor(float(B * (opts.max_completion_length or T)), device=mask.device)
    elif opts.num_items_in_batch is not None:
        denom = torch.as_tensor(opts.num_items_in_batch, dtype=torch.float32, device=mask.device)
    else:
        denom = mask.sum().clamp(min=1.0)
    return (1.0 / denom).expand(B).contiguous()


def _launch(logits: torch.Tensor, batch: _Batch, opts: _Options, dlogits: torch.Tensor | None) -> dict:
    """Runs the token-level kernel; fills `dlogits` (B, T, V) unless None. Returns per-token (B*T,) outputs."""
    B, T, V = logits.shape
    new = lambda dtype=torch.float32: torch.empty(B * T, dtype=dtype, device=logits.device)  # noqa: E731
    out = {"loss": new(), "entropy": new(), "ratio": new(), "code": new(torch.int8)}
    out["kl"] = new() if batch.ref_logps is not None else out["loss"]  # unused pointer without ref_logps
    mode = ADV_GIVEN if batch.advantages is not None else ADV_MODES[opts.scale_rewards]
    G = opts.group_size or 1
    block_v, warps = launch_config(V)
    eps_high = opts.epsilon if opts.epsilon_high is None else opts.epsilon_high
    weights = _row_weights(batch.mask, opts) if dlogits is not None else batch.mask
    grads = dlogits if dlogits is not None else logits  # unused pointer when forward-only
    adv_or_rewards = batch.advantages if batch.advantages is not None else batch.rewards
    if B * T:
        _grpo_token_kernel[(B * T,)](
            grads, out["loss"], out["entropy"], out["ratio"], out["kl"], out["code"],
            logits, batch.ids, batch.mask, adv_or_rewards, adv_or_rewards, weights,
            batch.old_logps if batch.old_logps is not None else batch.mask,
            batch.ref_logps if batch.ref_logps is not None else batch.mask,
            1.0 / opts.temperature, float(opts.beta), 1.0 - opts.epsilon, 1.0 + eps_high,
            float(opts.delta or 0.0), 1e-4,
            logits.stride(0), logits.stride(1), grads.stride(0), grads.stride(1),
            B, T, V, G,
            ADV_MODE=mode, BLOCK_R=triton.next_power_of_2(B if mode == ADV_BATCH else G),
            HAS_OLD=batch.old_logps is not None, HAS_REF=batch.ref_logps is not None,
            USE_BETA=opts.beta != 0, HAS_DELTA=opts.delta is not None, COMPUTE_GRAD=dlogits is not None,
            BLOCK_V=block_v, ROUND_BF16=round_bf16(grads), num_warps=warps,
        )  # fmt: skip
    return out


def _loss_and_metrics(out: dict, batch: _Batch, opts: _Options) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar loss (reference.reduce_loss) and the (6,) metrics, masked means over active tokens."""
    mask = batch.mask
    loss = reference.reduce_loss(
        out["loss"].view(mask.shape), mask, opts.loss_type, opts.max_completion_length, opts.num_items_in_batch
    )
    code = out["code"]
    kl = out["kl"] if batch.ref_logps is not None else torch.zeros_like(out["loss"])
    flags = [(code & 1).float(), (code >> 1).float(), (code != 0).float()]
    per_token = torch.stack([kl, out["entropy"], *flags, out["ratio"]])  # (6, B*T)
    metrics = (per_token * mask.view(1, -1)).sum(1) / mask.sum().clamp(min=1.0)
    return loss, metrics


class _GRPOTokenLoss(torch.autograd.Function):
    """Forward writes dlogits (the whole backward); backward hands them on, scaled by grad_output."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, batch: _Batch, opts: _Options):
        dlogits = logits if opts.inplace_backward else torch.empty_like(logits)  # (B, T, V): the only N*V
        loss, metrics = _loss_and_metrics(_launch(logits, batch, opts, dlogits), batch, opts)
        if opts.inplace_backward:
            inplace.hold(ctx, dlogits)  # the caller marks the logits consumed (inplace.consume)
        else:
            ctx.save_for_backward(dlogits)
        ctx.inplace = opts.inplace_backward
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_metrics):
        dlogits = inplace.held(ctx) if ctx.inplace else ctx.saved_tensors[0]
        # 1 for a plain loss.backward(): no N*V pass (one host sync). Scaled in place: a second backward
        # through the same graph (retain_graph) would scale again.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            dlogits.mul_(grad_loss.to(dlogits.dtype))
        return dlogits, None, None


def _sequence_level(logits: torch.Tensor, batch: _Batch, opts: _Options, advantages: torch.Tensor, **terms):
    """GSPO: pass 1 = logp and entropy per token, the O(N) terms in torch, pass 2 = the backward kernel."""
    B, T, V = logits.shape
    ids1d = batch.ids.reshape(-1)
    logits2d = rows_2d(logits)
    logp, ent = SelectiveLogSoftmax.apply(logits2d, ids1d, opts.temperature, True, opts.inplace_backward)
    if opts.inplace_backward:
        inplace.consume(logits2d)  # its backward writes dlogits there
    return reference.grpo_loss_from_logps(
        logp.view(B, T), batch.mask, advantages, entropy=ent.view(B, T), importance_sampling_level="sequence", **terms
    )


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    scale_rewards: str = "group",
    temperature: float = 1.0,
    inplace_backward: bool = False,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused GRPO loss; inputs are validated by `grpo_fast.loss.grpo_loss` (same keywords and semantics).

    Args:
        logits: (B, T, V) bfloat16/float16/float32 with contiguous columns, CUDA (or CPU interpreted).
        completion_ids: (B, T) int; completion_mask: (B, T) bool/int/float {0, 1}.
        advantages: (B,), or rewards (B,) with group_size and scale_rewards ("group" | "batch" | "none").
        old_logps, ref_logps: (B, T) float or None.
        inplace_backward: dlogits are written into the logits buffer, at token level already during the
            forward: the logits are consumed. Autograd sees the write (grpo_fast.inplace), so another use of
            them, saved before the call or made after it, raises in backward instead of reading gradients.
    Returns:
        (loss, metrics): a differentiable fp32 scalar, and detached fp32 scalars named in METRICS.
    """
    opts = _Options(
        float(temperature), beta, epsilon, epsilon_high, delta, loss_type, max_completion_length,
        num_items_in_batch, group_size, scale_rewards, inplace_backward,
    )  # fmt: skip
    batch = _Batch(
        completion_ids.contiguous(), completion_mask.to(torch.float32).contiguous(),
        None if advantages is None else advantages.contiguous(), None if rewards is None else rewards.contiguous(),
        None if old_logps is None else old_logps.contiguous(), None if ref_logps is None else ref_logps.contiguous(),
    )  # fmt: skip
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if importance_sampling_level == "sequence":
        adv = advantages if rewards is None else reference.group_advantages(rewards.float(), group_size, scale_rewards)
        terms = dict(old_logps=old_logps, ref_logps=ref_logps, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high)
        terms.update(delta=delta, loss_type=loss_type, max_completion_length=max_completion_length)
        return _sequence_level(logits, batch, opts, adv.float(), num_items_in_batch=num_items_in_batch, **terms)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, metrics = _GRPOTokenLoss.apply(logits, batch, opts)
        if inplace_backward:
            inplace.consume(logits)  # dlogits are in the buffer already: autograd must see the write
    else:  # forward only (evaluation, old/ref passes): loop 2 compiles away
        loss, metrics = _loss_and_metrics(_launch(logits, batch, opts, None), batch, opts)
    return loss, dict(zip(METRICS, metrics.detach().unbind()))
