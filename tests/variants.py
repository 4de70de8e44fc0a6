"""TRL 1.16's loss options beyond the four base loss types, as test cases shared by the fast-path tests.

Each variant: the loss keywords, and which per-call tensors it needs (vLLM importance ratios per token or per
row, the sampler's log-probs). `one_pass` says whether the materialized-logits kernel takes its one-pass
route (LossOptions.per_token); the tests cover both routes for every option they can.
"""

from __future__ import annotations

import math

import torch

from grpo_fast.reference import LossOptions

VARIANTS = {
    "cispo": dict(loss_type="cispo", epsilon_high=1.3),  # the cap binds on rows whose ratio is above 1.3
    "cispo-seq": dict(loss_type="cispo", epsilon_high=1.3, importance_sampling_level="sequence"),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=1.5, sapo_temperature_neg=2.0),
    "sapo-seq": dict(loss_type="sapo", importance_sampling_level="sequence"),
    "luspo": dict(loss_type="luspo", epsilon_high=0.28),  # token level: one pass
    "luspo-seq": dict(loss_type="luspo", importance_sampling_level="sequence"),  # the paper's setup
    "vespo": dict(loss_type="vespo", beta=0.04),
    "bias-kl": dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True),
    "bias-kl-seq": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True, importance_sampling_level="sequence"),
    "is-token": dict(loss_type="dapo", beta=0.04, _is="token"),
    "is-row": dict(loss_type="grpo", delta=1.5, _is="row"),
    "is-token-seq": dict(loss_type="grpo", importance_sampling_level="sequence", _is="token"),  # NaN where masked
    "vespo-is": dict(loss_type="vespo", _is="token"),
    "entropy-quantile": dict(loss_type="dapo", top_entropy_quantile=0.3),
    "off-policy": dict(loss_type="grpo", beta=0.04, off_policy_mask_threshold=0.05, _sampling=True),
    "entropy-bonus": dict(loss_type="bnpo", entropy_coef=0.05),  # one pass: the bonus' gradient in loop 2
    "entropy-bonus-sapo": dict(loss_type="sapo", entropy_coef=0.05, beta=0.04),
    "entropy-bonus-quantile": dict(loss_type="dr_grpo", entropy_coef=0.05, top_entropy_quantile=0.3),
    "one-pass-all": dict(loss_type="cispo", epsilon_high=1.3, beta=0.04, use_bias_correction_kl=True, _is="token")
    | dict(entropy_coef=0.02),
    "two-pass-all": dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.05)
    | dict(top_entropy_quantile=0.5, entropy_coef=0.02, delta=1.5, _is="token", _sampling=True),
}


def options(name: str) -> dict:
    """The loss keywords of a variant (without its tensor markers)."""
    return {k: v for k, v in VARIANTS[name].items() if not k.startswith("_")}


def one_pass(name: str) -> bool:
    return LossOptions(**options(name)).per_token


def tensors(name: str, old_logps: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> dict:
    """The variant's per-call tensors around `old_logps` (B, T): importance ratios in [0.5, 1.5] with some
    zeros (masked mode) and NaN at masked positions; sampler log-probs = old + noise, NaN where masked."""
    spec = VARIANTS[name]
    g = torch.Generator().manual_seed(seed)
    B, T = old_logps.shape
    out = {}
    masked = ~mask.bool().cpu()
    if spec.get("_is") == "token":
        ratio = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
        ratio[0, 0] = 0.0
        out["importance_sampling_ratio"] = ratio.masked_fill(masked, math.nan)
    elif spec.get("_is") == "row":
        out["importance_sampling_ratio"] = torch.tensor([[1.2], [0.7], [0.0], [1.0]], dtype=torch.float64)[:B]
    if spec.get("_sampling"):
        noise = 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
        out["sampling_logps"] = (old_logps.double().cpu() + noise).masked_fill(masked, math.nan)
    return {k: v.to(device=old_logps.device, dtype=old_logps.dtype) for k, v in out.items()}
