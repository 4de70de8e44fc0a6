"""TRL 1.16's own loss code run on plain tensors: the oracle of the loss-variant tests.

`trl.GRPOTrainer._compute_loss` is called unbound on a stub that holds only the attributes it reads, with
`_get_per_token_logps_and_entropies` returning given float64 log-probs and entropies (leaves, so the
gradients of TRL's loss with respect to them can be compared with ours). `get_high_entropy_mask`,
`get_off_policy_mask` and `get_gamma_weights` are TRL's own methods. The vLLM importance-sampling ratio
is a float64 transcription of the block in `_generate_and_score_completions` (it is not a method there).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections import defaultdict

import torch
import trl

from grpo_fast.reference import LossOptions

# our metric name -> TRL's
METRIC_NAMES = {
    "kl": "kl",
    "entropy": "entropy",
    "clip_ratio_low": "clip_ratio/low_mean",
    "clip_ratio_high": "clip_ratio/high_mean",
    "clip_ratio_region": "clip_ratio/region_mean",
    "cispo_clip_ratio": "cispo_clip_ratio",
    "vespo_phi_seq_mean": "vespo/phi_seq_mean",
    "policy_loss": "policy_loss",
}


class _Accelerator:
    """One process: reductions and gathers are the identity."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def autocast(self):
        return contextlib.nullcontext()


class _Stub:
    get_high_entropy_mask = trl.GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(trl.GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(trl.GRPOTrainer.get_gamma_weights)

    def __init__(self, opts: LossOptions, logps, entropy, use_vllm: bool, accumulation: int):
        self._logps, self._entropy = logps, entropy
        self.args = types.SimpleNamespace(
            delta=opts.delta, use_bias_correction_kl=opts.use_bias_correction_kl,
            sapo_temperature_pos=opts.sapo_temperature_pos, sapo_temperature_neg=opts.sapo_temperature_neg,
            vespo_k_pos=opts.vespo_k_pos, vespo_lambda_pos=opts.vespo_lambda_pos, vespo_k_neg=opts.vespo_k_neg,
            vespo_lambda_neg=opts.vespo_lambda_neg, steps_per_generation=accumulation,
        )  # fmt: skip
        self.model = types.SimpleNamespace(training=True)
        self.accelerator = _Accelerator()
        self.loss_type, self.beta = opts.loss_type, opts.beta
        self.epsilon_low, self.epsilon_high = opts.epsilon, opts.eps_high
        self.importance_sampling_level = opts.importance_sampling_level
        self.off_policy_mask_threshold = opts.off_policy_mask_threshold
        self.top_entropy_quantile = opts.top_entropy_quantile
        self.entropy_coef, self.use_adaptive_entropy = opts.entropy_coef, False
        self._entropy_bonus_enabled = opts.entropy_coef != 0.0
        self.use_vllm = self.vllm_importance_sampling_correction = use_vllm
        self.max_completion_length = opts.max_completion_length or logps.shape[1]
        self.current_gradient_accumulation_steps = accumulation
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, self._entropy, None


def compute_loss(
    logps, entropy, mask, advantages, *, old_logps=None, ref_logps=None, sampling_logps=None,
    importance_sampling_ratio=None, num_items_in_batch=None, accumulation: int = 1, **options,
):  # fmt: skip
    """TRL's (loss, {metric: value}) for the given per-token tensors; the loss scaled as TRL scales it for
    `accumulation` steps (train mode)."""
    opts = LossOptions(**options)
    stub = _Stub(opts, logps, entropy, importance_sampling_ratio is not None, accumulation)
    B, T = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch),
    }
    optional = dict(old_per_token_logps=old_logps, ref_per_token_logps=ref_logps)
    optional |= dict(sampling_per_token_logps=sampling_logps, importance_sampling_ratio=importance_sampling_ratio)
    inputs |= {k: v for k, v in optional.items() if v is not None}
    loss = trl.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def importance_sampling_ratio(old_logps, sampling_logps, completion_mask, mode, clip_min, clip_max):
    """Transcribed from TRL 1.16 `_generate_and_score_completions` (vLLM importance-sampling correction)."""
    mask = completion_mask
    per_token_logps_diff = (old_logps - sampling_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    delta = torch.abs(old_logps - sampling_logps)
    bool_mask = completion_mask.bool()
    delta = delta[bool_mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[bool_mask]
    stats = {
        "sampling_logp_difference_mean": torch.mean(delta),
        "sampling_logp_difference_max": torch.max(delta),
        "importance_sampling_ratio_min": torch.min(flat),
        "importance_sampling_ratio_mean": torch.mean(flat),
        "importance_sampling_ratio_max": torch.max(flat),
    }
    return ratio, stats


def multi_objective_advantages(rewards_per_func, num_generations, reward_weights, aggregation, scale_rewards):
    """Transcribed from TRL 1.16 `_generate_and_score_completions` (advantages from the (B, F) reward table)."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            if rewards.numel() > 1:
                std_rewards = nanstd(rewards).expand_as(rewards)
            else:
                std_rewards = torch.zeros_like(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:  # normalize_then_sum
        num_funcs = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, num_generations, num_funcs)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, num_funcs)
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)
