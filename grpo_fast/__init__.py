"""grpo-fast: fused Triton GRPO losses and a lean shared-prefix GRPO trainer."""

from .fused_linear import fused_linear_grpo_loss, fused_linear_logps
from .loss import (
    group_advantages,
    grpo_loss,
    importance_sampling_ratio,
    multi_objective_advantages,
    selective_log_softmax,
)
from .packing import sequence_logps
from .reference import LossOptions
from .rollout import Rollout, generate_groups

__all__ = [
    "selective_log_softmax",
    "group_advantages",
    "multi_objective_advantages",
    "importance_sampling_ratio",
    "LossOptions",
    "grpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_logps",
    "generate_groups",
    "Rollout",
    "sequence_logps",
]
__version__ = "0.1.0"
