"""The logit transform of `grpo_fast.logit_head` inside the kernels: logits / T from z = hidden @ W^T + b.

    softcap c:   logits / T = post * tanh(pre * z),  pre = scale / c,  post = c / T
    otherwise:   logits / T = pre * z,               pre = scale / T   (the scale folds into the temperature)

d(logits / T)/dz = pre * post * (1 - tanh^2(pre * z)) under the softcap. SOFTCAP is a constexpr: the common
no-transform case compiles to the same code as before (one multiply by 1 / T). tanh comes from exp alone (no
libdevice, which the interpreter lacks): within 3.5 fp32 ulps of the true tanh for every input, and its slope
4e / (1 + e)^2, e = exp(-2|u|), has no cancellation where tanh saturates (1 - t*t would round to 0 there).
"""

from __future__ import annotations

import triton
import triton.language as tl


def head_constants(temperature: float, logit_scale: float = 1.0, softcap: float | None = None):
    """(pre, post, SOFTCAP) of the module docstring, as the kernels take them."""
    if softcap is None:
        return logit_scale / temperature, 1.0, False
    return logit_scale / softcap, softcap / temperature, True


@triton.jit
def tanh_and_slope(u):
    """tanh(u) and 1 - tanh(u)^2, fp32. |u| < 0.3: the Taylor series to u^9 (the exp form would lose bits to
    cancellation in 1 - e there); else sign(u) * (1 - e) / (1 + e), e = exp(-2|u|) in (0, 1]: no overflow."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    p = -0.05396825396825397 + a2 * 0.021869488536155203  # -17/315 + 62/2835 u^2
    p = 0.13333333333333333 + a2 * p  # 2/15
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * p))
    t = tl.where(a < 0.3, series, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def transform(z, pre, post, SOFTCAP: tl.constexpr):
    """logits / T from the fp32 tile z."""
    if SOFTCAP:
        t, _ = tanh_and_slope(z * pre)
        return post * t
    return z * pre
