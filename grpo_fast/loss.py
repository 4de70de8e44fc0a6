"""Public fused ops over materialized logits: selective_log_softmax, group_advantages, grpo_loss, and the
advantage / importance-ratio helpers of TRL's recipes: multi_objective_advantages, importance_sampling_ratio.

Each validates on the host, then runs the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) or
the chunked torch path (plain CPU). The O(B*T) GRPO terms beside the kernels are `reference.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable

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


def multi_objective_advantages(
    rewards: torch.Tensor,
    group_size: int,
    reward_weights: torch.Tensor | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
) -> torch.Tensor:
    """Advantages (B,) from a (B, F) table of F reward functions' scores, TRL 1.16's multi-reward aggregation.

    `sum_then_normalize` (TRL's default): the `reward_weights`-weighted sum per row, normalized as
    `group_advantages`. `normalize_then_sum` (GDPO, arXiv 2601.05242): each function normalized within its
    group first, then the weighted sum normalized over the batch. NaN marks a score a function did not give
    (TRL: it returned None): it is left out of means and stds; a row no function scored gets A = 0.
    """
    checks.reward_table(rewards, group_size, reward_weights, multi_objective_aggregation, scale_rewards)
    return reference.multi_objective_advantages(
        rewards, group_size, reward_weights, multi_objective_aggregation, scale_rewards
    )


def importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The importance-sampling correction pi_old / pi_sampler of TRL's vLLM path, for `grpo_loss`'s
    `importance_sampling_ratio`: (B, T) in the token_* modes, (B, 1) in the sequence_* modes (exp of the
    row's summed log difference); *_truncate clamps to [clip_min, clip_max], *_mask zeroes ratios outside.

    Args:
        old_logps: (B, T) training-policy log-probs of the sampled tokens (no grad).
        sampling_logps: (B, T) the sampler's log-probs (NaN where it gave none: ratio 1 there).
        completion_mask: (B, T) {0, 1}; mode: one of reference.IS_MODES (TRL's vllm_importance_sampling_mode).
    Returns:
        (ratio, stats): stats are TRL's logged sampling_logp_difference_mean/max and
        importance_sampling_ratio_min/mean/max, detached scalars.
    """
    checks.importance_sampling(old_logps, sampling_logps, completion_mask, mode, clip_min, clip_max)
    return reference.importance_sampling_ratio(old_logps, sampling_logps, completion_mask, mode, clip_min, clip_max)


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
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_items_in_batch: float | torch.Tensor | None = None,
    entropy_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    inplace_backward: bool = False,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss over materialized logits, TRL 1.16's GRPOTrainer math (DESIGN.md, `reference.py`).

    Args:
        logits: (B, T, V) bf16/fp16/fp32; `logits[:, t]` scores `completion_ids[:, t]`.
        completion_ids: (B, T) int; completion_mask: (B, T) {0, 1}.
        advantages: (B,), or `rewards` (B,) with `group_size` (and `scale_rewards`) to compute them.
        old_logps, ref_logps: (B, T) log-probs of the sampling and the reference policy.
        sampling_logps: (B, T) the sampler's own log-probs (vLLM), for the off-policy mask (default: old_logps).
        importance_sampling_ratio: (B, T) or (B, 1), the vLLM correction (`importance_sampling_ratio()`).
        num_items_in_batch: the dapo / cispo / vespo normalizer (default: the active tokens).
        entropy_gather: maps this process's active-token entropies (n,) to every process's, so that
            top_entropy_quantile ranks the global batch (TRL gathers across processes); None: this call's.
        inplace_backward: write dlogits into the logits buffer (a non-leaf, e.g. the model's output), which
            the call consumes: another differentiable use of the logits, before or after, raises in backward.
        **options: the loss options, TRL's GRPOConfig names (`grpo_fast.LossOptions`, one comment each):
            loss_type (grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo), beta, epsilon,
            epsilon_high, delta, importance_sampling_level, max_completion_length, sapo_temperature_pos/neg,
            vespo_k_pos/lambda_pos/k_neg/lambda_neg, top_entropy_quantile, use_bias_correction_kl,
            off_policy_mask_threshold, entropy_coef.
    Passes over the logits (CUDA): ONE (read once, write dlogits once) for token-level importance without an
    entropy quantile or off-policy mask, every loss type but vespo, with any KL, vLLM ratio or entropy
    bonus; TWO otherwise (sequence level, luspo's GSPO setup, vespo, top_entropy_quantile < 1,
    off_policy_mask_threshold): a forward read, then the backward's read and write (3*N*V*b bytes).
    Returns:
        (loss, metrics): a scalar, and detached scalars kl, entropy, clip_ratio_low/high/region, ratio_mean,
        and by option policy_loss (before the entropy bonus), cispo_clip_ratio, vespo_phi_seq_mean,
        entropy_threshold, entropy_mask_ratio, entropy_kept_mean.
    """
    checks.tensor(logits, "logits", ndim=3)
    checks.floating(logits, "logits")
    B, T, V = logits.shape
    companions = dict(old_logps=old_logps, ref_logps=ref_logps, sampling_logps=sampling_logps)
    companions.update(importance_sampling_ratio=importance_sampling_ratio, num_items_in_batch=num_items_in_batch)
    opts = checks.grpo_batch(
        B, T, V, logits.device, completion_ids, completion_mask, options, advantages=advantages, rewards=rewards,
        group_size=group_size, scale_rewards=scale_rewards, temperature=temperature, **companions,
    )  # fmt: skip
    if inplace_backward:
        inplace.check(logits)
    version = logits._version
    loss, metrics = _grpo_loss(
        logits, completion_ids, completion_mask, opts, advantages, rewards, group_size, scale_rewards, temperature,
        inplace_backward, entropy_gather, companions,
    )  # fmt: skip
    if inplace_backward and logits._version == version:  # the path wrote into a copy (a layout it could not view)
        inplace.consume(logits)  # the caller's buffer is consumed all the same: one behaviour on every path
    return loss, metrics


def _grpo_loss(
    logits, completion_ids, completion_mask, opts, advantages, rewards, group_size, scale_rewards, temperature,
    inplace_backward, entropy_gather, companions,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The validated grpo_loss on the Triton kernel or the chunked torch path."""
    if use_triton(logits) and logits.dtype != torch.float64:
        from grpo_fast.kernels.grpo_loss import grpo_loss as kernel

        return kernel(
            logits, completion_ids, completion_mask, opts, advantages=advantages, rewards=rewards,
            group_size=group_size, scale_rewards=scale_rewards, temperature=temperature,
            inplace_backward=inplace_backward, entropy_gather=entropy_gather, **companions,
        )  # fmt: skip
    if advantages is None:
        advantages = reference.group_advantages(rewards.float(), group_size, scale_rewards)
    logps, entropy = chunked.logps_entropy(logits, completion_ids, temperature, inplace_backward)
    return reference.grpo_loss_from_logps(
        logps, completion_mask, advantages, entropy=entropy, entropy_gather=entropy_gather, **companions,
        **opts.asdict(),
    )  # fmt: skip
