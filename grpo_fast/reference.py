"""Plain torch reference of the GRPO math (DESIGN.md, parity with TRL's GRPOTrainer).

Readable rather than fast: every op materializes what it needs. Tests and benchmarks import these;
call them on float64 inputs for a ground truth. The fast paths (Triton kernels, chunked CPU paths)
must agree with them forward and backward.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature)[ids]; logits (..., V), ids (...) -> (...) in logits' dtype.

    A row holding NaN or +inf gets NaN (softmax is undefined there; torch would give -inf off the +inf column),
    as on every fast path."""
    x = logits / temperature
    logp = torch.log_softmax(x, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp + torch.where(torch.isposinf(x).any(-1), float("nan"), 0.0)  # additive: the gradient still flows


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last axis: (..., V) -> (...)."""
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


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask != 0, x, 0.0).sum() / mask.sum().clamp(min=1.0)  # where: 0 * NaN would be NaN


def _active(x: torch.Tensor | None, active: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else torch.where(active, x, 0.0)


def reduce_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar by `loss_type` (DESIGN.md)."""
    B, T = per_token_loss.shape
    masked = torch.where(mask != 0, per_token_loss, 0.0)  # masked values never count, even NaN or inf
    total = masked.sum()
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (B * (max_completion_length or T))
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum().clamp(min=1.0)
    return total / num_items_in_batch


def grpo_loss_from_logps(
    logps: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss from per-token log-probs (B, T) and advantages (B,). Returns (loss, metrics).

    `entropy` (B, T), if given, is only averaged into the metrics.
    """
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    # Masked positions may hold garbage (NaN/inf from padding): zero them first, through `where`, so that no
    # NaN reaches the loss, the metrics or (through exp's backward: 0 * NaN) the gradient.
    active = completion_mask != 0
    logps, entropy = _active(logps, active), _active(entropy, active)
    old = logps.detach() if old_logps is None else _active(old_logps, active)
    ref_logps = _active(ref_logps, active)
    log_ratio = logps - old  # (B, T)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (B, 1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # (B, T) or (B, 1)
    per_token_loss = per_token_loss.expand_as(logps)
    kl = None
    if ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl
    loss = reduce_loss(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        low = ((coef_1 < 1 - eps_low) & (adv < 0)).to(logps.dtype)
        high = ((coef_1 > 1 + eps_high) & (adv > 0)).to(logps.dtype)
        region = torch.maximum(low, high)
        if importance_sampling_level == "sequence":  # one flag per row, fraction over rows (TRL)
            clip = {k: v.mean() for k, v in (("low", low), ("high", high), ("region", region))}
        else:
            clip = {k: _masked_mean(v, mask) for k, v in (("low", low), ("high", high), ("region", region))}
        zero = logps.new_zeros(())
        metrics = {
            "kl": _masked_mean(kl, mask) if kl is not None else zero,
            "entropy": _masked_mean(entropy, mask) if entropy is not None else zero,
            "clip_ratio_low": clip["low"],
            "clip_ratio_high": clip["high"],
            "clip_ratio_region": clip["region"],
            "ratio_mean": _masked_mean(coef_1.expand_as(logps), mask),
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
    with torch.no_grad():
        entropy = entropy_from_logits(logits, temperature)
    return grpo_loss_from_logps(logps, completion_mask, advantages, entropy=entropy, **kwargs)
