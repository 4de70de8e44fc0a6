"""grpo-fast: fused Triton GRPO losses and a lean shared-prefix GRPO trainer."""

from .fused_linear import fused_linear_grpo_loss, fused_linear_logps
from .loss import group_advantages, grpo_loss, selective_log_softmax
from .packing import sequence_logps
from .rollout import Rollout, generate_groups

__all__ = [
    "selective_log_softmax",
    "group_advantages",
    "grpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_logps",
    "generate_groups",
    "Rollout",
    "sequence_logps",
]
__version__ = "0.1.0"
