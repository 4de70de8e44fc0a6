"""Plain torch reference of the GRPO math (DESIGN.md): TRL 1.16's GRPOTrainer, every loss option.

Readable rather than fast: every op materializes what it needs. Tests and benchmarks import these;
call them on float64 inputs for a ground truth. The fast paths (Triton kernels, chunked CPU paths)
must agree with them forward and backward. Provenance: `trl/trainer/grpo_trainer.py` 1.16
(`_compute_loss`, `get_high_entropy_mask`, `get_off_policy_mask`, `get_gamma_weights`, the vLLM
importance-sampling correction and the multi-objective advantages of `_generate_and_score_completions`).
One deliberate difference: a masked position (completion_mask 0) never influences anything here, even a
NaN there (TRL multiplies by the mask, so NaN * 0 would leak).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's clipped surrogate (TRL's clip metrics)
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # vLLM IS correction
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # multi-reward advantages (GDPO: the second)


@dataclass(frozen=True)
class LossOptions:
    """The loss fields of TRL 1.16's GRPOConfig, with its names and defaults (one exception, marked).

    As TRL, every loss_type runs at either importance level (TRL only warns for luspo at the token level,
    vespo at the sequence level and bnpo / dr_grpo / dapo / cispo at the sequence level), and vespo refuses
    a per-row vLLM ratio (TRL: the sequence_* IS modes).
    """

    loss_type: str = "dapo"  # one of LOSS_TYPES: the surrogate and its reduction (`reduce_loss`)
    beta: float = 0.0  # KL coefficient; the k3 estimator against ref_logps (required when beta != 0)
    epsilon: float = 0.2  # clipped ratio's lower bound 1 - epsilon
    epsilon_high: float | None = None  # upper bound 1 + epsilon_high (None: epsilon); cispo: the cap itself
    delta: float | None = None  # INTELLECT-2: the unclipped ratio capped at delta (clipping loss types)
    importance_sampling_level: str = "token"  # token, or sequence (GSPO: one mean log-ratio per row)
    max_completion_length: int | None = None  # dr_grpo's constant denominator per row (None: T)
    sapo_temperature_pos: float = 1.0  # SAPO's gate temperature where A > 0
    sapo_temperature_neg: float = 1.05  # ... where A <= 0
    vespo_k_pos: float = 2.0  # VESPO gamma weight's power where A >= 0
    vespo_lambda_pos: float = 3.0  # ... and its decay
    vespo_k_neg: float = 3.0  # ... power where A < 0
    vespo_lambda_neg: float = 2.0  # ... and its decay
    top_entropy_quantile: float = 1.0  # keep the policy term on the top fraction of tokens by entropy (1: all)
    use_bias_correction_kl: bool = False  # KL times the importance ratio (DeepSeek-V3.2). TRL's default is True
    off_policy_mask_threshold: float | None = None  # drop A < 0 rows whose mean KL(sampler || current) exceeds it
    entropy_coef: float = 0.0  # loss -= entropy_coef * mean entropy over the trained tokens

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def per_token(self) -> bool:
        """Every term is O(1) per token given the inputs: one pass over the logits computes loss and gradient.
        False when a row- or batch-level quantity of the current log-probs is needed first."""
        sequence = self.importance_sampling_level == "sequence" or self.loss_type == "vespo"
        return not sequence and self.top_entropy_quantile >= 1.0 and self.off_policy_mask_threshold is None

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature)[ids]; logits (..., V), ids (...) -> (...) in logits' dtype.

    A row holding NaN or +inf gets NaN (softmax is undefined there; torch would give -inf off the +inf column),
    as on every fast path."""
    x = logits / temperature
    logp = torch.log_softmax(x, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp + torch.where(torch.isposinf(x).any(-1), float("nan"), 0.0)  # additive: the gradient still flows


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last axis: (..., V) -> (...), differentiable."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # a -inf logit adds 0 (0 * log 0), not NaN


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """A = (r - mean_group(r)) / (std + eps); rewards (B,) in groups of `group_size` consecutive rows.

    std is unbiased: within the group (`group`), over all rows (`batch`), or not divided (`none`).
    A group of equal rewards gets A = 0; a group (or batch) of one row has std 0.
    """
    grouped = rewards.view(-1, group_size)  # (B/G, G)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (B,)
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return centered / (std + eps)


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaNs; NaN where fewer than 2 values (TRL's trainer.utils.nanstd)."""
    dims = () if dim is None else dim
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True) * count / (count - 1)
    std = torch.where(count > 1, var, torch.nan).sqrt()
    return std if keepdim else std.squeeze(dim) if dim is not None else std.reshape(())


def multi_objective_advantages(
    rewards: torch.Tensor,
    group_size: int,
    reward_weights: torch.Tensor | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages (B,) from a (B, F) table of F reward functions' scores, as TRL 1.16 forms them.

    NaN marks a score a function did not give (TRL: it returned None); a row no function scored gets A = 0.
    `sum_then_normalize`: the weighted sum per row, then `group_advantages`' normalization (NaN-aware).
    `normalize_then_sum` (GDPO): each function normalized within its group, the weighted sum, then
    normalized over the batch (`scale_rewards` is not used, as in TRL).
    """
    B, F = rewards.shape
    w = torch.ones(F, dtype=rewards.dtype, device=rewards.device) if reward_weights is None else reward_weights
    unscorable = torch.isnan(rewards).all(dim=1)  # (B,)
    if multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards.view(-1, group_size, F)
        std = _nanstd(grouped, 1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        normalized = ((grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (std + eps)).view(B, F)
        total = torch.where(unscorable, torch.nan, (normalized * w).nansum(dim=1))
        std_all = _nanstd(total) if B > 1 else torch.zeros((), dtype=total.dtype, device=total.device)
        return torch.nan_to_num((total - torch.nanmean(total)) / (std_all + eps), nan=0.0)
    total = torch.where(unscorable, torch.nan, (rewards * w).nansum(dim=1))  # (B,)
    grouped = total.view(-1, group_size)
    centered = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return torch.nan_to_num(centered, nan=0.0)
    if scale_rewards == "group":
        std = _nanstd(grouped, 1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(total)
    else:
        std = _nanstd(total).expand_as(total) if B > 1 else torch.zeros_like(total)
    return torch.nan_to_num(centered / (std + eps), nan=0.0)


def importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's vLLM importance-sampling correction pi_old / pi_sampler: (B, T) for token_* modes, (B, 1) for
    sequence_* modes (exp of the summed log difference); *_truncate clamps to [clip_min, clip_max], *_mask
    zeroes ratios outside. A NaN sampling log-prob (unscored) gives a zero difference. Also returns TRL's
    logged statistics: sampling_logp_difference mean/max (active, scored tokens) and the ratio's min/mean/max
    (over active tokens, or over rows at the sequence level)."""
    active = completion_mask.bool()
    diff = torch.nan_to_num(torch.where(active, old_logps - sampling_logps, 0.0), nan=0.0)  # (B, T)
    sequence = mode.startswith("sequence")
    log_ratio = diff.sum(-1, keepdim=True) if sequence else diff
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    with torch.no_grad():
        delta = (old_logps - sampling_logps).abs()
        delta = delta[active & ~torch.isnan(delta)]  # unscored tokens left out, not counted as 0
        flat = ratio.flatten() if sequence else ratio[active]
        stats = {
            "sampling_logp_difference_mean": _mean_or_zero(delta),
            "sampling_logp_difference_max": delta.max() if delta.numel() else delta.new_zeros(()),
            "importance_sampling_ratio_min": flat.min() if flat.numel() else flat.new_zeros(()),
            "importance_sampling_ratio_mean": _mean_or_zero(flat),
            "importance_sampling_ratio_max": flat.max() if flat.numel() else flat.new_zeros(()),
        }
    return ratio, stats


def _mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_zeros(())


def _masked_sum(x: torch.Tensor, active: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Sum of x over active positions; whatever a masked position holds (NaN included) never enters."""
    x = torch.where(active, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim, keepdim=keepdim)


def _masked_mean(x: torch.Tensor, active: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """TRL's global_masked_mean on one process: over active tokens (B, T), or over rows for a per-row (B, 1) x."""
    if per_row:
        return x.sum() / max(x.shape[0], 1)
    return _masked_sum(x, active) / active.sum().clamp(min=1)


def reduce_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar by `loss_type` (TRL's reduction, no accumulation scaling):
    grpo, sapo: mean over rows of the per-row token mean; bnpo: over active tokens; dr_grpo: over
    B * max_completion_length; dapo, cispo, vespo: over num_items_in_batch (default: active tokens);
    luspo: mean over rows of the per-row token sum."""
    active = mask.bool()
    B, T = per_token_loss.shape
    count = active.sum().clamp(min=1).to(per_token_loss.dtype)
    if loss_type in ("grpo", "sapo"):
        return (_masked_sum(per_token_loss, active, -1) / active.sum(-1).clamp(min=1)).mean()
    if loss_type == "luspo":
        return _masked_sum(per_token_loss, active, -1).mean()
    total = _masked_sum(per_token_loss, active)
    if loss_type == "bnpo":
        return total / count
    if loss_type == "dr_grpo":
        return total / (B * (max_completion_length or T))
    return total / (count if num_items_in_batch is None else num_items_in_batch)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation, the same float arithmetic) without its 2**24-element limit."""
    ordered = values.sort().values
    rank = torch.tensor(q, dtype=values.dtype, device=values.device) * (values.numel() - 1)
    below = rank.floor()
    lo, hi = ordered[below.long()], ordered[rank.ceil().long()]
    return torch.lerp(lo, hi, rank - below)


@torch.no_grad()
def high_entropy_mask(
    entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    top_entropy_quantile: float,
    entropy_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool: active tokens whose entropy is >= the (1 - top_entropy_quantile) quantile of the active
    tokens' entropies (fp32, as TRL), and that threshold. `entropy_gather` maps this process's (n,) values to
    every process's (TRL gathers across processes). No active token anywhere: nothing kept."""
    active = completion_mask.bool()
    values = entropy[active].float()  # (n,)
    if entropy_gather is not None:
        values = entropy_gather(values)
    if values.numel() == 0:  # nothing to rank: nothing kept (a finite 0 threshold for the metrics)
        return torch.zeros_like(active), entropy.new_zeros((), dtype=torch.float32)
    threshold = quantile(values, 1.0 - top_entropy_quantile)
    return (torch.where(active, entropy, 0.0) >= threshold) & active, threshold


@torch.no_grad()
def off_policy_mask(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (B, 1): keep a row when A >= 0 or its mean KL estimate
    sampling_logp - logp over active tokens is <= threshold. advantages (B, 1); NaN sampling log-probs count 0."""
    active = completion_mask.bool()
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_kl = _masked_sum(kl, active, -1, keepdim=True) / active.sum(-1, keepdim=True).clamp(min=1)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(logps.dtype)


@torch.no_grad()
def gamma_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    completion_mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None,
    opts: LossOptions,
) -> torch.Tensor:
    """VESPO's detached sequence weights phi(w) = exp(lambda + k log w - lambda w) (B, 1), w the sequence
    importance ratio exp(sum of clamped token log-ratios [+ log vLLM IS ratios]); k, lambda by the sign of A."""
    active = completion_mask.bool()
    lower = math.log(1e-8)
    seq = _masked_sum(torch.clamp(log_ratio, -20.0, 20.0), active, -1, keepdim=True)  # (B, 1)
    if importance_sampling_ratio is not None:
        seq = seq + _masked_sum(torch.clamp(torch.log(importance_sampling_ratio), lower, 20.0), active, -1, True)
    log_w = torch.clamp(seq, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, opts.vespo_k_pos, opts.vespo_k_neg)
    lam = torch.where(nonneg, opts.vespo_lambda_pos, opts.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _surrogate(logps, coef_1, log_ratio, adv, mask, is_ratio, opts: LossOptions):
    """The policy term by loss type: (per-token loss (B, T) or (B, 1), the ratio the metrics read, extras)."""
    extras = {}
    logps = torch.where(mask, logps, 0.0)  # cispo / vespo multiply logp itself: a NaN gradient there stays masked
    if opts.loss_type == "cispo":  # MiniMax-M1: the ratio capped and detached, times A and logp
        per_token = -torch.clamp(coef_1, max=opts.eps_high).detach() * adv * logps
    elif opts.loss_type == "sapo":  # a sigmoid gate instead of the hard clip
        tau = torch.where(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    elif opts.loss_type == "vespo":
        phi = gamma_weights(adv, log_ratio, mask, is_ratio, opts)  # (B, 1), no gradient
        per_token, extras["phi"] = -phi * adv * logps, phi
    else:  # PPO's clipped surrogate; delta caps the unclipped ratio after coef_2 is formed
        coef_2 = torch.clamp(coef_1, 1 - opts.epsilon, 1 + opts.eps_high)
        if opts.delta is not None:
            coef_1 = torch.clamp(coef_1, max=opts.delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    return per_token, coef_1, extras


def _ratio_metrics(coef_1, adv, active, opts: LossOptions, extras: dict) -> dict:
    """Clip fractions (TRL's for the clipping loss types; the same flags as diagnostics for the others),
    the mean ratio, cispo_clip_ratio and vespo_phi_seq_mean."""
    dtype, per_row = coef_1.dtype, opts.importance_sampling_level == "sequence"  # (B, 1) flags: one per row
    low = ((coef_1 < 1 - opts.epsilon) & (adv < 0)).to(dtype)
    high = ((coef_1 > 1 + opts.eps_high) & (adv > 0)).to(dtype)
    out = {
        "clip_ratio_low": _masked_mean(low, active, per_row),
        "clip_ratio_high": _masked_mean(high, active, per_row),
        "clip_ratio_region": _masked_mean(torch.maximum(low, high), active, per_row),
        "ratio_mean": _masked_mean(coef_1.expand(active.shape), active),
    }
    if opts.loss_type == "cispo":
        out["cispo_clip_ratio"] = _masked_mean(((coef_1 > opts.eps_high) & (adv > 0)).to(dtype), active, per_row)
    if opts.loss_type == "vespo":
        out["vespo_phi_seq_mean"] = _masked_mean(extras["phi"], active, per_row=True)
    return out


def _importance_weights(log_ratio: torch.Tensor, active: torch.Tensor, level: str) -> torch.Tensor:
    """Token level: the log-ratio (B, T); sequence level (GSPO): its mean over active tokens (B, 1)."""
    if level == "token":
        return log_ratio
    return _masked_sum(log_ratio, active, -1, keepdim=True) / active.sum(-1, keepdim=True).clamp(min=1)


def _kl(logps, ref_logps, coef_1, active, opts: LossOptions):
    """k3 estimate of KL(current || ref) per token (B, T), times the ratio with use_bias_correction_kl."""
    diff = torch.where(active, ref_logps - logps, 0.0)
    kl = torch.exp(diff) - diff - 1
    return kl * coef_1 if opts.use_bias_correction_kl else kl


def _entropy_terms(entropy, active, opts: LossOptions, entropy_gather):
    """The high-entropy mask (None at quantile 1), and the tokens the entropy bonus averages over."""
    if opts.top_entropy_quantile >= 1.0:
        return None, active, {}
    keep, threshold = high_entropy_mask(entropy, active, opts.top_entropy_quantile, entropy_gather)
    stats = {
        "entropy_threshold": threshold.to(entropy.dtype),  # fp32 -> fp64 is exact
        "entropy_mask_ratio": keep.sum().to(entropy.dtype) / active.sum().clamp(min=1),
        "entropy_kept_mean": _masked_sum(entropy.detach(), keep) / keep.sum().clamp(min=1),
    }
    return keep, keep, stats


def grpo_loss_from_logps(
    logps: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    entropy_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL 1.16's `_compute_loss` from per-token log-probs (B, T), advantages (B,) and `LossOptions` keywords.

    Order (TRL's): off-policy row mask and entropy token mask from the current log-probs / entropies; ratio
    (token or sequence level); KL (x ratio when bias-corrected); the surrogate of `loss_type`; x off-policy
    mask, x entropy mask, x importance_sampling_ratio (vLLM correction, (B, T) or (B, 1); vespo folds it
    into its weights instead); + beta * KL; `reduce_loss`; - entropy_coef * the mean entropy over the
    trained tokens. `entropy` (B, T) is needed for top_entropy_quantile < 1 and entropy_coef != 0 (then it
    must be differentiable); `sampling_logps` (B, T) feeds the off-policy mask (default: old_logps).
    Returns (loss, metrics): detached scalars kl, entropy, clip_ratio_low/high/region, ratio_mean, and by
    option policy_loss (the loss before the entropy bonus), cispo_clip_ratio, vespo_phi_seq_mean,
    entropy_threshold, entropy_mask_ratio (the fraction of active tokens the entropy mask keeps) and
    entropy_kept_mean (their mean entropy: what the entropy bonus and TRL's adaptive control average).
    """
    opts = LossOptions(**options)
    if entropy is None and (opts.top_entropy_quantile < 1.0 or opts.entropy_coef != 0.0):
        raise ValueError("entropy is required with top_entropy_quantile < 1 or entropy_coef != 0")
    active = completion_mask.bool()
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (B, 1)
    old = logps.detach() if old_logps is None else old_logps
    if importance_sampling_ratio is not None:  # a factor: 0, not NaN, where masked (a (B, 1) row sum sees them all)
        counted = active if importance_sampling_ratio.shape[-1] == active.shape[-1] else active.any(-1, keepdim=True)
        importance_sampling_ratio = torch.where(counted, importance_sampling_ratio, 0.0)
    entropy_mask, trained, entropy_stats = _entropy_terms(entropy, active, opts, entropy_gather)
    keep_rows = None
    if opts.off_policy_mask_threshold is not None:
        sampling = old if sampling_logps is None else sampling_logps
        keep_rows = off_policy_mask(adv, logps, sampling, active, opts.off_policy_mask_threshold)
    log_ratio = torch.where(active, logps - old, 0.0)  # (B, T)
    coef_1 = torch.exp(_importance_weights(log_ratio, active, opts.importance_sampling_level))
    kl = None if ref_logps is None else _kl(logps, ref_logps, coef_1, active, opts)
    per_token, coef_metric, extras = _surrogate(logps, coef_1, log_ratio, adv, active, importance_sampling_ratio, opts)
    factors = (keep_rows, entropy_mask, None if opts.loss_type == "vespo" else importance_sampling_ratio)
    for factor in (f for f in factors if f is not None):  # TRL's order: off-policy, entropy, vLLM ratio
        per_token = per_token * factor
    if kl is not None and opts.beta != 0.0:
        per_token = per_token + opts.beta * kl
    per_token = per_token.expand_as(logps)
    loss = reduce_loss(per_token, active, opts.loss_type, opts.max_completion_length, num_items_in_batch)
    policy_loss = loss.detach()
    if opts.entropy_coef != 0.0:
        loss = loss - opts.entropy_coef * _masked_sum(entropy, trained) / trained.sum().clamp(min=1)
    with torch.no_grad():
        zero = logps.new_zeros(())
        metrics = {
            "kl": _masked_mean(kl, active) if kl is not None else zero,
            "entropy": _masked_mean(entropy, active) if entropy is not None else zero,
            **_ratio_metrics(coef_metric, adv, active, opts, extras),
            **({"policy_loss": policy_loss} if opts.entropy_coef != 0.0 else {}),  # TRL logs it with the bonus
            **entropy_stats,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


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
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference GRPO loss over materialized logits (B, T, V); keywords as `grpo_fast.grpo_loss`."""
    if advantages is None:
        advantages = group_advantages(rewards.to(logits.dtype), group_size, scale_rewards)
    logits = torch.where(completion_mask.unsqueeze(-1) != 0, logits, 0.0)  # padding rows may hold NaN/inf garbage
    logps = selective_log_softmax(logits, completion_ids, temperature)
    entropy = entropy_from_logits(logits, temperature)  # differentiable: the entropy bonus' gradient
    return grpo_loss_from_logps(logps, completion_mask, advantages, entropy=entropy, **kwargs)
