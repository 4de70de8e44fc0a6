"""GRPO loss over materialized logits (B, T, V) in Triton, TRL 1.16's GRPOTrainer math (DESIGN.md).

One pass (`LossOptions.per_token`: token-level importance, no entropy quantile, no off-policy mask, not
vespo): ONE launch from rewards (or advantages) to the per-token loss AND dlogits. Each program owns one
token row: a prologue computes its row's group advantage from the group's G rewards, loop 1 streams the
row's V logits once (online log-sum-exp, entropy, target logit), the O(1) terms of `grpo_token_terms.py`
give the loss and d loss / d logp (every loss type but vespo, bias-corrected KL, vLLM importance ratios
per token or per row, the entropy bonus), and loop 2 streams the row again (from L2 on a GPU, mostly) to
write dlogits = w_row * m * dloss/dlogp * (onehot - softmax) / T (+ the entropy bonus' -g_H p (log p + H) / T).
The reduction's weight w_row is known from the mask alone, so nothing waits for the scalar loss. Bytes:
reads N*V*b, writes N*V*b (2*N*V*b, the floor; a separate forward and backward costs 3*N*V*b); masked
tokens and rows with a zero gradient (A = 0, no KL, no bonus) are not read at all. Nothing N*V is
allocated besides the gradient, and with `inplace_backward` not even that.
Two passes (every other option: sequence-level importance (GSPO, luspo as its paper runs it), vespo's
sequence weights, the entropy quantile over the whole batch, the off-policy mask): a row- or batch-level
quantity of the current log-probs comes first. Pass 1 is the selective log-softmax forward with entropy
(reads N*V*b), the O(N) terms run in torch (`reference.grpo_loss_from_logps`), pass 2 is its backward
kernel (reads N*V*b, writes N*V*b): 3*N*V*b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grpo_fast import inplace, reference
from grpo_fast.reference import LossOptions

from .grpo_token_terms import ADV_BATCH, ADV_GIVEN, ADV_MODES, LOSS_KINDS, _advantage, _kl_terms, _surrogate
from .selective_log_softmax import (
    SelectiveLogSoftmax,
    _row_logsumexp,
    _row_softmax_grad,
    launch_config,
    round_bf16,
    rows_2d,
)

IS_NONE, IS_TOKEN, IS_ROW = 0, 1, 2  # vLLM importance ratios: none, (B, T), (B, 1)
METRICS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean")


@triton.jit
def _grpo_token_kernel(
    dlogits_ptr, loss_ptr, ent_ptr, ratio_ptr, kl_ptr, code_ptr,  # outputs: (B, T, V), then (B*T,) each; inputs:
    logits_ptr, ids_ptr, mask_ptr, adv_ptr, rewards_ptr, weight_ptr, ent_weight_ptr, old_ptr, ref_ptr, is_ptr,
    inv_temp, beta, clip_low, clip_high, delta, cispo_cap, tau_pos, tau_neg, reward_eps,  # scalars
    stride_lb, stride_lt, stride_db, stride_dt,  # strides (columns are contiguous)
    B, T, V, G,  # shapes
    ADV_MODE: tl.constexpr, BLOCK_R: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    USE_BETA: tl.constexpr, HAS_DELTA: tl.constexpr, LOSS_KIND: tl.constexpr, BIAS_KL: tl.constexpr,
    IS_MODE: tl.constexpr, ENT_BONUS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
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
    ent = lse - mean_x
    old = logp  # old_logps = logp.detach(): ratio 1
    if HAS_OLD:
        old = tl.load(old_ptr + tok).to(tl.float32)
    adv = _advantage(adv_ptr, rewards_ptr, b, B, G, reward_eps, ADV_MODE, BLOCK_R)
    c1_raw = tl.exp(logp - old)
    loss, dlogp, ratio = _surrogate(
        logp, c1_raw, adv, clip_low, clip_high, delta, cispo_cap, tau_pos, tau_neg, HAS_DELTA, LOSS_KIND
    )
    if IS_MODE != 0:  # TRL multiplies the policy term (after its masks, before the KL) by the vLLM ratio
        w = tl.load(is_ptr + (tok if IS_MODE == 1 else b)).to(tl.float32)
        loss *= w
        dlogp *= w
    kl = tl.zeros_like(logp)  # a tensor, not a constexpr, in the stores below
    if HAS_REF:
        kl, dkl = _kl_terms(logp, tl.load(ref_ptr + tok).to(tl.float32), c1_raw, BIAS_KL)
        if USE_BETA:
            loss += beta * kl
            dlogp += beta * dkl
    code = ((ratio < clip_low) & (adv < 0.0)).to(tl.int8) + 2 * ((ratio > clip_high) & (adv > 0.0)).to(tl.int8)
    if LOSS_KIND == 1:  # cispo_clip_ratio's flag
        code += 4 * ((c1_raw > cispo_cap) & (adv > 0.0)).to(tl.int8)
    tl.store(loss_ptr + tok, tl.where(active, loss, 0.0))  # masked tokens: finite zeros
    tl.store(ent_ptr + tok, tl.where(active, ent, 0.0))
    tl.store(ratio_ptr + tok, tl.where(active, ratio, 0.0))
    tl.store(code_ptr + tok, tl.where(active, code, 0).to(tl.int8))
    if HAS_REF:
        tl.store(kl_ptr + tok, tl.where(active, kl, 0.0))
    if COMPUTE_GRAD:  # loop 2
        g = tl.where(active, tl.load(weight_ptr + b) * dlogp, 0.0)
        g_ent = 0.0
        if ENT_BONUS:  # d loss / d entropy of the bonus: -entropy_coef / active tokens (one device scalar)
            g_ent = tl.where(active, tl.load(ent_weight_ptr), 0.0)
        dst = dlogits_ptr + b * stride_db + t * stride_dt
        _row_softmax_grad(dst, row_ptr, target, g, g_ent, ent, lse, inv_temp, V, BLOCK_V, ENT_BONUS, ROUND_BF16)


@dataclass
class _Batch:
    """The validated per-row and per-token companions of the logits, ready for the kernel."""

    ids: torch.Tensor  # (B, T) int, contiguous
    mask: torch.Tensor  # (B, T) fp32 {0, 1}
    advantages: torch.Tensor | None  # (B,)
    rewards: torch.Tensor | None  # (B,)
    old_logps: torch.Tensor | None  # (B, T)
    ref_logps: torch.Tensor | None  # (B, T)
    is_ratio: torch.Tensor | None  # (B, T) or (B, 1): the vLLM importance-sampling correction


@dataclass
class _Setup:
    """The loss options and how this call is normalized and run."""

    opts: LossOptions
    temperature: float
    num_items_in_batch: float | torch.Tensor | None
    group_size: int | None
    scale_rewards: str
    inplace_backward: bool


def _row_weights(mask: torch.Tensor, setup: _Setup) -> torch.Tensor:
    """(B,) fp32: d loss / d per-token loss of an active token in row b, by loss_type (reference.reduce_loss)."""
    B, T = mask.shape
    loss_type = setup.opts.loss_type
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (B * mask.sum(-1).clamp(min=1.0))
    if loss_type == "luspo":
        denom = torch.tensor(float(B), device=mask.device)
    elif loss_type == "bnpo":
        denom = mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        denom = torch.tensor(float(B * (setup.opts.max_completion_length or T)), device=mask.device)
    elif setup.num_items_in_batch is not None:
        denom = torch.as_tensor(setup.num_items_in_batch, dtype=torch.float32, device=mask.device)
    else:
        denom = mask.sum().clamp(min=1.0)
    return (1.0 / denom).expand(B).contiguous()


def _launch(logits: torch.Tensor, batch: _Batch, setup: _Setup, dlogits: torch.Tensor | None) -> dict:
    """Runs the token-level kernel; fills `dlogits` (B, T, V) unless None. Returns per-token (B*T,) outputs."""
    B, T, V = logits.shape
    opts = setup.opts
    new = lambda dtype=torch.float32: torch.empty(B * T, dtype=dtype, device=logits.device)  # noqa: E731
    out = {"loss": new(), "entropy": new(), "ratio": new(), "code": new(torch.int8)}
    out["kl"] = new() if batch.ref_logps is not None else out["loss"]  # unused pointer without ref_logps
    mode = ADV_GIVEN if batch.advantages is not None else ADV_MODES[setup.scale_rewards]
    is_mode = IS_NONE if batch.is_ratio is None else (IS_TOKEN if batch.is_ratio.shape[-1] == T else IS_ROW)
    block_v, warps = launch_config(V)
    weights = _row_weights(batch.mask, setup) if dlogits is not None else batch.mask
    ent_weight = -opts.entropy_coef / batch.mask.sum().clamp(min=1.0).reshape(1)  # (1,) no host sync
    grads = dlogits if dlogits is not None else logits  # unused pointer when forward-only
    adv_or_rewards = batch.advantages if batch.advantages is not None else batch.rewards
    unused = batch.mask
    if B * T:
        _grpo_token_kernel[(B * T,)](
            grads, out["loss"], out["entropy"], out["ratio"], out["kl"], out["code"],
            logits, batch.ids, batch.mask, adv_or_rewards, adv_or_rewards, weights, ent_weight,
            batch.old_logps if batch.old_logps is not None else unused,
            batch.ref_logps if batch.ref_logps is not None else unused,
            batch.is_ratio if batch.is_ratio is not None else unused,
            1.0 / setup.temperature, float(opts.beta), 1.0 - opts.epsilon, 1.0 + opts.eps_high,
            float(opts.delta or 0.0), float(opts.eps_high), float(opts.sapo_temperature_pos),
            float(opts.sapo_temperature_neg), 1e-4,
            logits.stride(0), logits.stride(1), grads.stride(0), grads.stride(1),
            B, T, V, setup.group_size or 1,
            ADV_MODE=mode, BLOCK_R=triton.next_power_of_2(B if mode == ADV_BATCH else setup.group_size or 1),
            HAS_OLD=batch.old_logps is not None, HAS_REF=batch.ref_logps is not None,
            USE_BETA=opts.beta != 0, HAS_DELTA=opts.delta is not None,
            LOSS_KIND=LOSS_KINDS.get(opts.loss_type, 0), BIAS_KL=opts.use_bias_correction_kl, IS_MODE=is_mode,
            ENT_BONUS=opts.entropy_coef != 0, COMPUTE_GRAD=dlogits is not None,
            BLOCK_V=block_v, ROUND_BF16=round_bf16(grads), num_warps=warps,
        )  # fmt: skip
    return out


def metric_names(opts: LossOptions) -> tuple[str, ...]:
    """The metrics of a one-pass call, in the order `_loss_and_metrics` stacks them (reference.py's names)."""
    bonus = ("policy_loss",) if opts.entropy_coef != 0.0 else ()
    return METRICS + bonus + (("cispo_clip_ratio",) if opts.loss_type == "cispo" else ())


def _loss_and_metrics(out: dict, batch: _Batch, setup: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar loss (reference.reduce_loss, minus the entropy bonus) and the metrics, stacked in the order
    of `metric_names`: masked means over active tokens, the policy loss with the bonus, cispo's flag."""
    mask, opts = batch.mask, setup.opts
    count = mask.sum().clamp(min=1.0)
    policy = reference.reduce_loss(
        out["loss"].view(mask.shape), mask, opts.loss_type, opts.max_completion_length, setup.num_items_in_batch
    )
    loss = policy - opts.entropy_coef * (out["entropy"] * mask.view(-1)).sum() / count if opts.entropy_coef else policy
    code = out["code"]
    kl = out["kl"] if batch.ref_logps is not None else torch.zeros_like(out["loss"])
    flags = [(code & 1).float(), ((code >> 1) & 1).float(), ((code & 3) != 0).float()]
    flags += [((code >> 2) & 1).float()] if opts.loss_type == "cispo" else []
    per_token = torch.stack([kl, out["entropy"], *flags[:3], out["ratio"], *flags[3:]])  # (6 or 7, B*T)
    means = (per_token * mask.view(1, -1)).sum(1) / count
    bonus = [policy.detach().reshape(1)] if opts.entropy_coef else []
    return loss, torch.cat([means[:6], *bonus, means[6:]])


class _GRPOTokenLoss(torch.autograd.Function):
    """Forward writes dlogits (the whole backward); backward hands them on, scaled by grad_output."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, batch: _Batch, setup: _Setup):
        dlogits = logits if setup.inplace_backward else torch.empty_like(logits)  # (B, T, V): the only N*V
        loss, metrics = _loss_and_metrics(_launch(logits, batch, setup, dlogits), batch, setup)
        if setup.inplace_backward:
            inplace.hold(ctx, dlogits)  # the caller marks the logits consumed (inplace.consume)
        else:
            ctx.save_for_backward(dlogits)
        ctx.inplace = setup.inplace_backward
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


def _two_pass(logits: torch.Tensor, batch: _Batch, setup: _Setup, advantages: torch.Tensor, **companions):
    """Pass 1 = logp and entropy per token (both differentiable), the O(N) terms in torch, pass 2 = the backward
    kernel (with the entropy's gradient term when the bonus is on)."""
    B, T, _ = logits.shape
    ids1d = batch.ids.reshape(-1)
    logits2d = rows_2d(logits)
    logp, ent = SelectiveLogSoftmax.apply(logits2d, ids1d, setup.temperature, True, setup.inplace_backward)
    if setup.inplace_backward:
        inplace.consume(logits2d)  # its backward writes dlogits there
    return reference.grpo_loss_from_logps(
        logp.view(B, T), batch.mask, advantages, entropy=ent.view(B, T), old_logps=batch.old_logps,
        ref_logps=batch.ref_logps, importance_sampling_ratio=batch.is_ratio,
        num_items_in_batch=setup.num_items_in_batch, **companions, **setup.opts.asdict(),
    )  # fmt: skip


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    opts: LossOptions,
    *,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    scale_rewards: str = "group",
    temperature: float = 1.0,
    inplace_backward: bool = False,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    entropy_gather=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused GRPO loss; inputs are validated by `grpo_fast.loss.grpo_loss` (same keywords and semantics).

    Args:
        logits: (B, T, V) bfloat16/float16/float32 with contiguous columns, CUDA (or CPU interpreted).
        completion_ids: (B, T) int; completion_mask: (B, T) bool/int/float {0, 1}.
        opts: the loss options; `opts.per_token` picks one pass or two (module docstring).
        advantages: (B,), or rewards (B,) with group_size and scale_rewards ("group" | "batch" | "none").
        old_logps, ref_logps, sampling_logps: (B, T) float or None; importance_sampling_ratio: (B, T) or (B, 1).
        inplace_backward: dlogits are written into the logits buffer (in one pass already during the
            forward): the logits are consumed. Autograd sees the write (grpo_fast.inplace), so another use of
            them, saved before the call or made after it, raises in backward instead of reading gradients.
    Returns:
        (loss, metrics): a differentiable fp32 scalar, and detached fp32 scalars (reference.grpo_loss_from_logps).
    """
    setup = _Setup(opts, float(temperature), num_items_in_batch, group_size, scale_rewards, inplace_backward)
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    batch = _Batch(
        completion_ids.contiguous(), completion_mask.to(torch.float32).contiguous(), contiguous(advantages),
        contiguous(rewards), contiguous(old_logps), contiguous(ref_logps), contiguous(importance_sampling_ratio),
    )  # fmt: skip
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if not opts.per_token:
        adv = advantages if rewards is None else reference.group_advantages(rewards.float(), group_size, scale_rewards)
        companions = dict(sampling_logps=sampling_logps, entropy_gather=entropy_gather)
        return _two_pass(logits, batch, setup, adv.float(), **companions)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, metrics = _GRPOTokenLoss.apply(logits, batch, setup)
        if inplace_backward:
            inplace.consume(logits)  # dlogits are in the buffer already: autograd must see the write
    else:  # forward only (evaluation, old/ref passes): loop 2 compiles away
        loss, metrics = _loss_and_metrics(_launch(logits, batch, setup, None), batch, setup)
    return loss, dict(zip(metric_names(opts), metrics.detach().unbind()))
