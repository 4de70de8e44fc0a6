"""Attention of the shared-prefix training forward (DESIGN.md, "Shared prefix"), and the pieces the rollout
cascade (cascade.py) shares with it.

Training rows are `[P | C1 | ... | CG]`, described by a segment id per token (0 for the prompt, i for the
tokens of completion i, -1 for the padding at the end of a row) and a position per token (0..Lp-1 for P,
restarting at Lp for every Ci). A token keeps
`keep(q, kv) = kv <= q and (seg[kv] == 0 or seg[kv] == seg[q])`: causal within its own completion and over
the whole prompt; in a sliding-window layer also `pos[q] - pos[kv] < window`, transformers' window semantics
(`sliding_window_overlay`: the query itself counts, a key `window` positions back is out) in position terms,
which equal the index terms of the unpacked row [P | Ci]. Padding queries see the prompt and earlier padding,
so no softmax row is empty (an empty row is NaN in SDPA, and NaN * 0 in backward would still poison the
gradients).

Each layer gets the mask of its own window: the model runs under the `PACKED` attention implementation, and
`packed_attention` picks the mask for the `sliding_window` the layer passes (the value transformers hands to
flash-attention, so it is the model's own per-layer choice, whatever config fields it came from). It then calls
transformers' own kernels: FlexAttention with a BlockMask on CUDA (soft-capping in its score_mod, attention
sinks renormalized by its log-sum-exp), SDPA with a dense boolean mask elsewhere, or the model's own eager
function with an additive mask when the layer soft-caps its attention scores or adds sinks (SDPA does neither).
Kwargs the engine does not know raise `UnsupportedModelError` instead of being ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BACKENDS = ("auto", "sdpa", "flex")
PACKED = "grpo_fast_packed"
# The implementation names a model that attends in its own code (not through AttentionInterface) must see.
LEGACY_NAMES = {"sdpa": "sdpa", "flex": "flex_attention"}
# Kwargs models pass to their attention function that do not change what it computes.
_INERT = {"position_ids", "use_cache", "output_attentions", "output_router_logits", "cache_position"}
_HANDLED = {"sliding_window", "s_aux", "softcap", "is_causal", "grpo_packed"}


class UnsupportedModelError(ValueError):
    """The engine cannot run this model exactly: raised instead of computing something else."""


@dataclass(frozen=True)
class Options:
    """What a layer asks of its attention beyond softmax(q k^T * scaling) v under a causal mask."""

    window: int | None  # sliding window in positions (transformers' semantics), None = full attention
    sinks: torch.Tensor | None  # (heads,) learned logits added once to every softmax denominator (GPT-OSS)
    softcap: float | None  # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)


def attention_options(module, kwargs: dict, where: str) -> Options:
    """Reads the attention kwargs a layer passed; refuses the ones `where` cannot honour."""
    name = type(module).__name__
    unknown = sorted(k for k, v in kwargs.items() if k not in _INERT | _HANDLED and v is not None)
    if unknown:
        raise UnsupportedModelError(
            f"{name} passes {', '.join(unknown)} to its attention function, which {where} does not implement"
        )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise UnsupportedModelError(f"{name} attends bidirectionally; {where} is causal")
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UnsupportedModelError(f"{name} passes sliding_window={window!r}, which {where} cannot use")
    return Options(window, kwargs.get("s_aux"), kwargs.get("softcap"))


def routes_through_interface(model) -> bool:
    """Whether the model's code looks its attention function up in transformers' AttentionInterface (every
    model rewritten for transformers v5; not e.g. Falcon, which attends in its own code)."""
    return hasattr(sys.modules.get(type(model).__module__), "ALL_ATTENTION_FUNCTIONS")


def resolve_backend(attention: str, device: torch.device) -> str:
    """`auto` is FlexAttention on CUDA (sparse blocks skipped) and SDPA with a dense mask elsewhere: FlexAttention
    has no CPU backward."""
    if attention not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {attention!r}")
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attention


def use_implementation(config, name: str) -> None:
    """Points the model's attention at `name`, persistently: gradient checkpointing recomputes attention during
    backward, after any context manager around the forward would have exited."""
    if config._attn_implementation != name:
        config._attn_implementation = name


def _keep(segments, positions, window: int | None, b, q, kv):
    """The packed keep rule for index tensors b, q, kv (broadcast together); shared by the dense and flex masks."""
    seg_kv = segments[b, kv]
    keep = (kv <= q) & ((seg_kv == 0) | (seg_kv == segments[b, q]))
    if window is not None:
        keep = keep & (positions[b, q] - positions[b, kv] < window)
    return keep


def flex_mask_mod(segments: torch.Tensor, positions: torch.Tensor, window: int | None):
    """The packed keep rule as a FlexAttention mask_mod (b, h, q, kv index scalars -> bool)."""

    def mask_mod(b, h, q, kv):
        return _keep(segments, positions, window, b, q, kv)

    return mask_mod


def packed_mask(segments: torch.Tensor, positions: torch.Tensor, backend: str, window: int | None = None):
    """The shared-prefix mask of packed rows, within `window` positions if given. segments, positions (R, L)
    long -> bool (R, 1, L, L) (True = attend) for SDPA, or a FlexAttention BlockMask (O(R * L^2 / 128^2) bytes
    instead of R * L^2)."""
    R, L = segments.shape
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod = flex_mask_mod(segments, positions, window)
        return create_block_mask(mask_mod, B=R, H=None, Q_LEN=L, KV_LEN=L, device=segments.device)
    idx = torch.arange(L, device=segments.device)
    b = torch.arange(R, device=segments.device)[:, None, None]
    return _keep(segments, positions, window, b, idx[None, :, None], idx[None, None, :])[:, None]  # (R, 1, L, L)


@dataclass
class PackedMasks:
    """The masks of one packed forward, one per window the layers ask for, built on first use (gradient
    checkpointing's recompute reuses them). `calls` counts the attention calls that went through
    `packed_attention` with this object: 0 after a forward means the model does not pass forward kwargs down to its
    attention function, so no layer could be given its window."""

    segments: torch.Tensor  # (R, L) long
    positions: torch.Tensor  # (R, L) long
    backend: str  # "sdpa" or "flex"
    calls: int = 0
    built: dict = field(default_factory=dict)

    def get(self, window: int | None):
        if window not in self.built:
            self.built[window] = packed_mask(self.segments, self.positions, self.backend, window)
        return self.built[window]


def _model_eager(module):
    """The model's own eager attention function (it implements sinks and soft-capping as the model defines them)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} soft-caps its attention or adds sinks, and its module has no "
            "eager_attention_forward for the engine to run"
        )
    return fn


def _additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A boolean mask (or None: causal, bottom-right aligned as SDPA's skipped mask) as the additive float mask
    eager attention adds to its scores; an additive mask already (built for eager before the model was pointed at
    PACKED, and replayed by gradient checkpointing's recompute) passes through."""
    if mask is not None and mask.is_floating_point():
        return mask.to(query.dtype)
    if mask is None:
        Lq, Lk = query.shape[-2], key.shape[-2]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(Lk - Lq)
    return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function of `PACKED`. query (R, heads, L, d), key/value (R, kv_heads, L, d) ->
    ((R, L, heads, d), weights or None). In a packed forward (`grpo_packed` kwarg) the mask is the one of the
    layer's window; otherwise (an ordinary forward of a model left on PACKED) it is the one transformers built."""
    masks: PackedMasks | None = kwargs.get("grpo_packed")
    opts = attention_options(module, kwargs, "the packed forward")
    if masks is not None:
        masks.calls += 1
        attention_mask = masks.get(opts.window)
        if masks.backend == "flex":
            from transformers.integrations.flex_attention import flex_attention_forward

            mask = attention_mask
            return flex_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    if opts.sinks is None and opts.softcap is None:
        mask = attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    mask = _additive(attention_mask, query, key)
    return _model_eager(module)(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, sdpa_mask)  # ordinary forwards get SDPA's boolean masks (windows included)


def partial_attention(q, k, v, keep, scaling: float, softcap: float | None = None):
    """Softmax attention over the kept keys and its log-sum-exp, in fp32. q (..., M, d), k/v (..., S, d), keep
    broadcast to (..., M, S) -> ((..., M, d), (..., M, 1)); a row with no kept key gives 0 and lse -inf."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling  # (..., M, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (..., M, 1)
    probs = torch.exp(scores - lse.clamp_min(torch.finfo(lse.dtype).min))  # an empty row: exp(-inf) = 0
    return torch.matmul(probs.to(v.dtype), v).float(), lse


def merge_partials(parts, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Merges partial attentions [(out, lse)] over disjoint key sets into one softmax; `sinks` (broadcast to the
    lse shape) enter the denominator once, as a key whose value is 0."""
    lses = [lse for _, lse in parts]
    if sinks is not None:
        lses.append(sinks.float().expand_as(lses[0]))
    total = lses[0]
    for lse in lses[1:]:  # pairwise, not logsumexp(stack): inductor (torch 2.13, CPU) reused a stacked buffer's
        total = torch.logaddexp(total, lse)  # slices as free memory twice and corrupted the compiled decode step
    return sum(out * torch.exp(lse - total) for out, lse in parts)
