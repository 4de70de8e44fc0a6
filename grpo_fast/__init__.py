"""grpo-fast: fused Triton GRPO losses and a lean shared-prefix GRPO trainer."""

from .loss import group_advantages, grpo_loss, selective_log_softmax

__all__ = ["selective_log_softmax", "group_advantages", "grpo_loss"]
__version__ = "0.1.0"
