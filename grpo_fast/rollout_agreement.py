"""The rollout's own log-probs in training (train.py): how far they are from the training forward's, every step, and
`--old-logps-from rollout`.

The rollout samples each token from log_softmax(logits / T) of the cascade decode (generate_groups(...,
return_logps=True)); the training forward scores the same tokens through the packed shared-prefix forward and the
fused loss. Same weights, same math, different kernels and summation orders: in fp32 they agree to ~1e-6 nats, in
bf16 to the rounding of bf16 activations (README, "Rollout and training log-probs").

Metrics, over the active tokens of all micro-batches and ranks, d = training - rollout log-prob:
`rollout_logp_diff_mean` and `rollout_logp_diff_max` (|d|), `rollout_ratio_outside` (the fraction of tokens whose
exp(d) leaves [0.9, 1.1]). The training log-probs cost nothing extra: they are the old log-probs when those are
computed (num_iterations > 1, or old_logps_from=rollout), else the first update's forward hands them out
(fused_linear_grpo_loss(..., logps_out=)).

old_logps_from=rollout replaces the no-grad old forward (num_iterations > 1) with the rollout's log-probs as the
behaviour policy, as TRL treats vLLM's: the first update's forward gives the training policy's log-probs of the
sampled tokens (pi_old: the weights have not moved yet; one no-grad sweep of the LM head over its hidden states,
no decoder pass), which are the old log-probs of every update, and each token's loss is weighted by TRL's
importance-sampling correction pi_old / pi_rollout (`importance_sampling_ratio`, cfg.rollout_is_*: truncated or
masked, per token or per sequence). Where rollout and training agree the weight is 1 and the loss equals the
on-policy one.
"""

from __future__ import annotations

import torch

from . import distributed
from .fused_linear import fused_linear_logps
from .loss import importance_sampling_ratio

BAND = (0.9, 1.1)  # ratios exp(training - rollout) outside this band count in rollout_ratio_outside


def training_logps_buffer(mb: dict) -> torch.Tensor | None:
    """A (b*G, T) buffer for the first update's forward to fill (logps_out), when no old log-probs exist to compare
    the rollout's with; None otherwise (or when the rollout has none)."""
    if mb.get("sampling") is None or mb.get("old") is not None or "training" in mb:
        return None
    mb["training"] = torch.zeros(mb["ids"].shape, dtype=torch.float32, device=mb["ids"].device)
    return mb["training"]


@torch.no_grad()
def rollout_old_logps(hidden, weight, bias, head: dict, mb: dict, cfg) -> None:
    """old_logps_from=rollout, first update: mb["old"] = the training policy's log-probs (b*G, T) from this forward's
    hidden states (b*G, T, H), and mb["is_ratio"] = TRL's importance-sampling correction against the rollout's."""
    if mb.get("sampling") is None:
        raise ValueError("old_logps_from='rollout' needs the rollout's log-probs (generate_groups(return_logps=True))")
    mask = mb["mask"]
    logps = fused_linear_logps(hidden.detach(), weight, mb["ids"], bias=bias, temperature=cfg.temperature, **head)
    mb["old"] = torch.where(mask.bool(), logps, 0.0)
    mb["is_ratio"], _ = importance_sampling_ratio(
        mb["old"], mb["sampling"], mask, cfg.rollout_is_mode, cfg.rollout_is_min, cfg.rollout_is_max
    )


def agreement_metrics(mbs: list[dict]) -> dict:
    """The mismatch metrics (module docstring), and under old_logps_from=rollout the importance ratio's min / mean /
    max (over active tokens, or rows in the sequence modes, as TRL logs them); {} without rollout log-probs."""
    training = [mb["old"] if mb.get("old") is not None else mb.get("training") for mb in mbs]
    if not mbs or any(mb.get("sampling") is None for mb in mbs) or any(t is None for t in training):
        return {}
    diff = torch.cat([(t - mb["sampling"])[mb["mask"].bool()] for t, mb in zip(training, mbs)]).double()  # (n,)
    outside = (diff.exp() < BAND[0]) | (diff.exp() > BAND[1])
    total = distributed.all_sum([float(diff.abs().sum()), float(outside.sum()), diff.numel()])
    n = max(total[2], 1.0)
    (peak,) = distributed.all_max([float(diff.abs().max()) if diff.numel() else 0.0])
    out = {"rollout_logp_diff_mean": total[0] / n, "rollout_logp_diff_max": peak, "rollout_ratio_outside": total[1] / n}
    if any("is_ratio" in mb for mb in mbs):
        out |= _ratio_stats(mbs)
    return out


def _ratio_stats(mbs: list[dict]) -> dict:
    """importance_sampling_ratio_min / _mean / _max over every rank's active tokens (rows in the sequence modes)."""
    flat = [r.flatten() if r.shape[1] == 1 else r[mb["mask"].bool()] for mb in mbs for r in [mb["is_ratio"]]]
    flat = torch.cat(flat).double()
    total = distributed.all_sum([float(flat.sum()), flat.numel()])
    extremes = [-float(flat.min()), float(flat.max())] if flat.numel() else [-float("inf")] * 2  # every rank reduces
    low, high = distributed.all_max(extremes) if total[1] else (0.0, 0.0)
    return {
        "importance_sampling_ratio_min": -low,
        "importance_sampling_ratio_mean": total[0] / max(total[1], 1.0),
        "importance_sampling_ratio_max": high,
    }
