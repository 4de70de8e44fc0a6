"""The per-token O(1) terms of the one-pass GRPO kernel (`grpo_loss.py`), one @triton.jit helper per term.

Each mirrors a line of `grpo_fast.reference` (TRL 1.16's `_compute_loss`) for one token at the token level:
the row's group advantage, the surrogate of the loss type with d loss / d logp, and the KL term. Every
option is a constexpr, so the common configuration compiles to exactly the code it had before.
"""

from __future__ import annotations

import triton
import triton.language as tl

ADV_GIVEN, ADV_GROUP, ADV_BATCH, ADV_NONE = 0, 1, 2, 3
ADV_MODES = {"group": ADV_GROUP, "batch": ADV_BATCH, "none": ADV_NONE}
KIND_CLIP, KIND_CISPO, KIND_SAPO = 0, 1, 2  # the surrogate: PPO's clip (grpo/bnpo/dr_grpo/dapo/luspo), cispo, sapo
LOSS_KINDS = {"cispo": KIND_CISPO, "sapo": KIND_SAPO}  # any other per-token loss type: KIND_CLIP


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
def _clip_terms(c1_raw, adv, clip_low, clip_high, delta, HAS_DELTA: tl.constexpr):
    """PPO's clipped surrogate -min(c1 A, c2 A): (loss, d loss / d logp, the ratio metrics read). As the
    reference, coef_2 clamps the ratio before delta caps coef_1; torch.min's tie splits its gradient in halves.
    min/max propagate NaN as torch's do (the default drops it: -min(NaN, t2) would give a finite -t2)."""
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
    return loss, dlogp, c1


@triton.jit
def _surrogate(
    logp, c1_raw, adv, clip_low, clip_high, delta, cispo_cap, tau_pos, tau_neg,
    HAS_DELTA: tl.constexpr, LOSS_KIND: tl.constexpr,
):  # fmt: skip
    """(loss, d loss / d logp, the ratio the clip metrics read) of the loss type's policy term.
    cispo: -min(ratio, cap) A logp with the capped ratio detached; sapo: -(4 / tau) sigmoid(tau (ratio - 1)) A,
    tau by the sign of A, whose derivative is -4 A s (1 - s) ratio."""
    if LOSS_KIND == 1:  # KIND_CISPO
        capped = tl.minimum(c1_raw, cispo_cap, propagate_nan=tl.PropagateNan.ALL)
        loss, dlogp, ratio = -capped * adv * logp, -capped * adv, c1_raw
    elif LOSS_KIND == 2:  # KIND_SAPO
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (c1_raw - 1.0))
        loss, dlogp, ratio = -s * 4.0 / tau * adv, -4.0 * adv * s * (1.0 - s) * c1_raw, c1_raw
    else:
        loss, dlogp, ratio = _clip_terms(c1_raw, adv, clip_low, clip_high, delta, HAS_DELTA)
    return loss, dlogp, ratio


@triton.jit
def _kl_terms(logp, ref, c1_raw, BIAS_KL: tl.constexpr):
    """(kl, d kl / d logp): the k3 estimator exp(ref - logp) - (ref - logp) - 1, times the ratio (whose
    derivative is the ratio itself) when bias-corrected."""
    diff = ref - logp
    kl = tl.exp(diff) - diff - 1.0
    dkl = 1.0 - tl.exp(diff)
    if BIAS_KL:
        dkl = c1_raw * (dkl + kl)
        kl = kl * c1_raw
    return kl, dkl
