"""Public fused ops over materialized logits: selective_log_softmax, group_advantages, grpo_loss.

Each validates on the host, then runs the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) or
the chunked torch path (plain CPU). The O(B*T) GRPO terms beside the kernels are `reference.py`'s.
"""

from __future__ import annotations

import torch

from . import checks, chunked, inplace, reference
from .backend import use_triton


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at `ids`, without another logits-sized tensor.

    Args:
        logits: (..., V) float16/bfloat16/float32/float64.
        ids: (...) int64/int32 in [0, V).
        temperature: positive float.
    Returns:
        logps (...) float32 (float64 for float64 logits), differentiable with respect to `logits`.
    """
    checks.tensor(logits, "logits")
    checks.tensor(ids, "ids")
    checks.floating(logits, "logits")
    if logits.dim() < 1 or tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"ids must have shape {tuple(logits.shape[:-1])}, got {tuple(ids.shape)}")
    checks.same_device("logits", logits, ("ids", ids))
    checks.ids_in_range(ids, logits.shape[-1], "ids")
    checks.positive_number(temperature, "temperature")
    if logits.dtype == torch.float64:
        return reference.selective_log_softmax(logits, ids, temperature)
    if use_triton(logits):
        from grpo_fast.kernels.selective_log_softmax import selective_log_softmax as kernel

        return kernel(logits, ids, temperature)
    return chunked.selective_log_softmax(logits, ids, temperature)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (r - mean_group) / (std + eps) for rewards (B,) in groups of
    `group_size` consecutive rows; `scale_rewards` picks the std: `group`, `batch` or `none`.
    Returns (B,) in rewards' dtype; a group of equal rewards gets 0."""
    checks.rewards(rewards, group_size, scale_rewards, eps)
    return reference.group_advantages(rewards, group_size, scale_rewards, eps)


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    scale_rewards: str = "group",
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss over materialized logits, TRL's GRPOTrainer math (DESIGN.md).

    Args:
        logits: (B, T, V) bf16/fp16/fp32; `logits[:, t]` scores `completion_ids[:, t]`.
        completion_ids: (B, T) int; completion_mask: (B, T) {0, 1}.
        advantages: (B,), or `rewards` (B,) with `group_size` (and `scale_rewards`) to compute them.
        old_logps, ref_logps: (B, T) log-probs of the sampling and the reference policy.
        inplace_backward: write dlogits into the logits buffer (a non-leaf, e.g. the model's output), which
            the call consumes: another differentiable use of the logits, before or after, raises in backward.
    Returns:
        (loss, metrics): a scalar, and detached scalars kl, entropy, clip_ratio_low/high/region,
        ratio_mean.
    """
    checks.tensor(logits, "logits", ndim=3)
    checks.floating(logits, "logits")
    B, T, V = logits.shape
    checks.grpo_batch(
        B, T, V, logits.device, completion_ids, completion_mask, advantages=advantages, rewards=rewards,
        group_size=group_size, scale_rewards=scale_rewards, old_logps=old_logps, ref_logps=ref_logps,
        num_items_in_batch=num_items_in_batch, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta,
        temperature=temperature, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
    )  # fmt: skip
    if inplace_backward:
        inplace.check(logits)
    version = logits._version
    loss, metrics = _grpo_loss(
        logits, completion_ids, completion_mask, advantages, rewards, group_size, scale_rewards, temperature,
        inplace_backward, old_logps=old_logps, ref_logps=ref_logps, beta=beta, epsilon=epsilon,
        epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )  # fmt: skip
    if inplace_backward and logits._version == version:  # the path wrote into a copy (a layout it could not view)
        inplace.consume(logits)  # the caller's buffer is consumed all the same: one behaviour on every path
    return loss, metrics


def _grpo_loss(
    logits, completion_ids, completion_mask, advantages, rewards, group_size, scale_rewards, temperature,
    inplace_backward, **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The validated grpo_loss on the Triton kernel or the chunked torch path."""
    if use_triton(logits) and logits.dtype != torch.float64:
        from grpo_fast.kernels.grpo_loss import grpo_loss as kernel

        return kernel(
            logits,
            completion_ids,
            completion_mask,
            advantages=advantages,
            rewards=rewards,
            group_size=group_size,
            scale_rewards=scale_rewards,
            temperature=temperature,
            inplace_backward=inplace_backward,
            **options,
        )
    if advantages is None:
        advantages = reference.group_advantages(rewards.float(), group_size, scale_rewards)
    logps = chunked.selective_log_softmax(logits, completion_ids, temperature, inplace_backward)
    entropy = chunked.entropy(logits, temperature)
    return reference.grpo_loss_from_logps(logps, completion_mask, advantages, entropy=entropy, **options)
