"""Token sampling of the rollouts from pre-drawn noise, so that it can run inside a compiled, captured decode step.

A `torch.Generator` cannot enter a compiled graph (dynamo breaks the graph on it) or a CUDA graph replay, so the
randomness is drawn up front: `draw_noise` takes one float64 uniform per row and step from the seeded generator,
in one launch before the first step, and `sample` turns row i's uniform u into a token by inverse CDF sampling of
softmax(filtered logits / T): the token whose CDF interval [cdf[v-1], cdf[v]) holds u * total. The eager and the
compiled decode run this same arithmetic on the same noise, so a seeded rollout gives the same tokens either way.

Exactness: probabilities are exp(x - max) in fp32 (each within 1e-7 relative of the true one), accumulated in fp64
(the CDF is off by at most about V * 2^-53 of the total), and the uniforms have 53 random bits; a token of
probability 0 (filtered out, or exp underflow below e^-103 of the best) has an empty interval and is never drawn.
"""

from __future__ import annotations

import torch


def draw_noise(generator: torch.Generator | None, steps: int, rows: int, device: torch.device) -> torch.Tensor:
    """(steps, rows) float64 uniforms in [0, 1): row i's draw at step t is noise[t, i]. One generator call per
    rollout, so the generator's state after it does not depend on when rows finish."""
    return torch.rand(steps, rows, generator=generator, device=device, dtype=torch.float64)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """top-k, then nucleus (top-p) filtering of (N, V) fp32 logits as in transformers' logits warpers: dropped
    tokens get -inf (ties with the k-th logit are kept; top-p keeps at least the most likely token)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row of (N, V) fp32 logits from the row's uniform u (N,) float64, by inverse CDF of
    softmax(filter(logits / temperature)); temperature 0 is greedy (argmax, u unused). Rows are independent.
    No host synchronization and static shapes: it runs inside the compiled decode step."""
    if temperature == 0:
        return logits.argmax(-1)
    x = filter_logits(logits / temperature, top_k, top_p)
    p = torch.exp(x - x.amax(-1, keepdim=True))  # (N, V) unnormalized, the best token at 1; filtered at 0
    cdf = p.double().cumsum(-1)  # (N, V) fp64: small probabilities survive the accumulation
    total = cdf[:, -1:]  # (N, 1), >= 1
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    token = torch.searchsorted(cdf, target, right=True)  # (N, 1): the first v with cdf[v] > target
    return token.squeeze(-1).clamp_max(logits.shape[-1] - 1)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature)[tokens] (N,) fp32 of (N, V) fp32 logits, unfiltered: the log-prob the
    training forward computes for the sampled token (top-k / top-p change what is drawn, not this)."""
    x = logits / temperature
    return x.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)
