"""`inplace_backward=True`: a loss takes the logits buffer and writes dlogits into it (the token-level kernel
during its forward, the other paths during backward). Autograd is told, so that no other use of the logits can
silently read the overwritten values:

- `consume(logits)` right after the loss marks the buffer dirty (`ctx.mark_dirty` in a one-output Function: the
  only form autograd allows for views). The version bump makes a use saved BEFORE the call raise in its backward;
  the buffer's history now ends in `_Consumed`, so a differentiable use AFTER the call raises there.
- The loss itself keeps the buffer with `hold` / `held` instead of save_for_backward (whose version check the
  bump would trip), checking the version by hand: any other in-place write in between still raises.
"""

from __future__ import annotations

import torch

CONSUMED = (
    "the logits were passed to a loss with inplace_backward=True, which overwrites them with their gradient: "
    "they cannot be used again (compute other terms from a copy, or use inplace_backward=False)"
)


def check(logits: torch.Tensor) -> None:
    """A leaf that requires grad (or a view of one) cannot be written in place: its .grad would alias its data."""
    base = logits if logits._base is None else logits._base
    if torch.is_grad_enabled() and logits.requires_grad and base.is_leaf:
        raise ValueError(
            "inplace_backward=True writes dlogits into logits, which is (a view of) a leaf tensor that requires "
            "grad; pass the model's output (a non-leaf), or inplace_backward=False"
        )


class _Consumed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        if bool((grad != 0).any()):  # a zero gradient (a use of another region of the base) is harmless
            raise RuntimeError(CONSUMED)
        return torch.zeros_like(grad)  # not None: a view's CopySlices would then drop the base's other regions too


def consume(logits: torch.Tensor) -> None:
    """Marks `logits` as overwritten by the loss that was just applied to it (a no-op without autograd)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        _Consumed.apply(logits)


def hold(ctx, buffer: torch.Tensor) -> None:
    """Keeps the logits buffer for backward; `consume` (called once, after this Function) bumps its version."""
    ctx.buffer, ctx.buffer_version = buffer, buffer._version + 1


def held(ctx) -> torch.Tensor:
    if ctx.buffer._version != ctx.buffer_version:
        raise RuntimeError("the logits buffer of an inplace_backward loss was modified before its backward")
    return ctx.buffer
