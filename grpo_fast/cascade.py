"""Cascade attention of the rollouts (DESIGN.md, "Shared prefix"): each prompt's K/V is kept once and the G rows
of its group decode against it plus their own K/V, two partial attentions merged by log-sum-exp.

Rollouts register one attention function with transformers' `AttentionInterface`; it runs in two modes:
`prefill` (batch 1, one prompt: causal attention, and the prompt's K/V are copied into a (B, kv_heads, Lp, d)
buffer, once per prompt) and `decode` (B*G rows, one token each). Its buffers are all allocated during the
prefill, so a decode step has static shapes, allocates no buffer and never syncs with the host: it compiles
whole and is captured as a CUDA graph (decode.py). A layer's options (attention.py `Options`) hold in both modes:
a sliding window keeps the keys at positions > p - window of a query at position p (prompt token j sits at
position j, own token s of a row at Lp + s), soft-capping applies to every score, and attention sinks enter the
merged softmax once (not once per partial).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .attention import (
    Options,
    UnsupportedModelError,
    attention_options,
    merge_partials,
    partial_attention,
    routes_through_interface,
)

CASCADE = "grpo_fast_cascade"
PREFILL_CHUNK = 512  # queries per block when the prefill materializes its scores (sinks, soft-capping)
PREFIX_BUCKET = 16  # prompt K/V slots come in multiples of this (after two sizes the compiled step is dynamic in it)


@dataclass
class CascadeState:
    """Rollout K/V: per layer, the prompts' K/V once (B, kv_heads, Lp_slots, d) and every row's own K/V
    (B*G, kv_heads, max_new, d); d is the key or the value head size (they differ in e.g. DeepSeek-V3).
    Rows b*G .. b*G+G-1 belong to prompt b. Lp_slots is the longest prompt rounded up to PREFIX_BUCKET (the
    slots past a prompt's length are masked). Every buffer is allocated during the prefill, so the decode steps
    have static shapes and allocate nothing (decode.py compiles and captures them)."""

    prompt_lengths: torch.Tensor  # (B,) long
    group_size: int
    max_new: int
    mode: str = "prefill"
    prompt: int = 0  # the prompt being prefilled
    step: torch.Tensor | None = None  # 0-d long: the own-KV slot the decoded token writes (preallocated)
    prefix_k: dict = field(default_factory=dict)
    prefix_v: dict = field(default_factory=dict)
    own_k: dict = field(default_factory=dict)
    own_v: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.long, device=self.prompt_lengths.device)

    @property
    def prefix_slots(self) -> int:
        longest = int(self.prompt_lengths.max())
        return -(-longest // PREFIX_BUCKET) * PREFIX_BUCKET

    def store_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copies one prompt's K/V (1, kv_heads, Lp, d); allocates this layer's buffers on the first prompt."""
        if layer not in self.prefix_k:
            B, N, L = self.prompt_lengths.numel(), self.prompt_lengths.numel() * self.group_size, self.prefix_slots
            self.prefix_k[layer] = k.new_zeros(B, k.shape[1], L, k.shape[3])
            self.prefix_v[layer] = v.new_zeros(B, v.shape[1], L, v.shape[3])
            self.own_k[layer] = k.new_zeros(N, k.shape[1], self.max_new, k.shape[3])
            self.own_v[layer] = v.new_zeros(N, v.shape[1], self.max_new, v.shape[3])
        self.prefix_k[layer][self.prompt, :, : k.shape[2]] = k[0]
        self.prefix_v[layer][self.prompt, :, : v.shape[2]] = v[0]

    def store_own(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the decoded token's K/V (N, kv_heads, 1, d) at slot `step`; returns the row's own K/V buffers."""
        self.own_k[layer].index_copy_(2, self.step.view(1), k)
        self.own_v[layer].index_copy_(2, self.step.view(1), v)
        return self.own_k[layer], self.own_v[layer]


def _within(distance: torch.Tensor, window: int | None) -> torch.Tensor | bool:
    """distance = query position - key position (>= 0): kept by the window (transformers: distance < window)."""
    return True if window is None else distance < window


def _prefill(q, k, v, scaling: float, opts: Options) -> torch.Tensor:
    """Causal attention over one prompt: q/k (1, heads or kv_heads, Lp, d), v (1, kv_heads, Lp, dv) ->
    (1, heads, Lp, dv)."""
    Lp, d, kvh = q.shape[2], q.shape[3], k.shape[1]
    idx = torch.arange(Lp, device=q.device)
    if opts.sinks is None and opts.softcap is None:
        if opts.window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        keep = (idx[None] <= idx[:, None]) & _within(idx[:, None] - idx[None], opts.window)  # (Lp, Lp)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling, enable_gqa=True)
    r = q.shape[1] // kvh
    qg, kg, vg = q.view(1, kvh, r, Lp, d), k[:, :, None], v[:, :, None]  # a kv head's r query heads share it
    sinks = None if opts.sinks is None else opts.sinks.view(1, kvh, r, 1, 1)
    out = []
    for q0 in range(0, Lp, PREFILL_CHUNK):  # (kvh, r, chunk, Lp) fp32 scores at a time
        rows = idx[q0 : q0 + PREFILL_CHUNK, None]
        keep = (idx[None] <= rows) & _within(rows - idx[None], opts.window)  # (chunk, Lp)
        part = partial_attention(qg[:, :, :, q0 : q0 + PREFILL_CHUNK], kg, vg, keep, scaling, opts.softcap)
        out.append(merge_partials([part], sinks))
    return torch.cat(out, dim=3).view(1, kvh * r, Lp, v.shape[3]).to(q.dtype)


def _decode(state: CascadeState, layer: int, q, k, v, scaling: float, opts: Options) -> torch.Tensor:
    """One token per row: q/k (B*G, heads or kv_heads, 1, d), v (B*G, kv_heads, 1, dv) -> (B*G, 1, heads, dv)."""
    N, h, _, d = q.shape
    B, G, kvh, dv = N // state.group_size, state.group_size, k.shape[1], v.shape[3]
    r = h // kvh
    # The prefix pass reads each prompt's K/V once for its G rows: the G*r queries of a kv head are one batch.
    qp = q.reshape(B, G, kvh, r, d).transpose(1, 2).reshape(B, kvh, G * r, d)
    pk, pv = state.prefix_k[layer], state.prefix_v[layer]  # (B, kvh, Lp_max, d)
    j = torch.arange(pk.shape[2], device=q.device)
    lengths = state.prompt_lengths[:, None]  # (B, 1): the query sits at position Lp + step
    keep = (j < lengths) & _within(lengths + state.step - j, opts.window)  # (B, Lp_max)
    o1, l1 = partial_attention(qp, pk, pv, keep[:, None, None, :], scaling, opts.softcap)  # (B, kvh, G*r, dv)
    o1 = o1.view(B, kvh, G, r, dv).transpose(1, 2).reshape(N, kvh, r, dv)
    l1 = l1.view(B, kvh, G, r, 1).transpose(1, 2).reshape(N, kvh, r, 1)
    ok, ov = state.store_own(layer, k, v)  # (N, kvh, max_new, d)
    s = torch.arange(state.max_new, device=q.device)
    seen = (s <= state.step) & _within(state.step - s, opts.window)  # (max_new,)
    o2, l2 = partial_attention(q.reshape(N, kvh, r, d), ok, ov, seen, scaling, opts.softcap)  # (N, kvh, r, dv)
    sinks = None if opts.sinks is None else opts.sinks.view(1, kvh, r, 1)
    out = merge_partials([(o1, l1), (o2, l2)], sinks)  # (N, kvh, r, dv)
    return out.reshape(N, 1, h, dv).to(q.dtype)


_ACTIVE: list[CascadeState] = []  # the state of the rollout running under cascade_implementation


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query (N, heads, q_len, d), key/value (N, kv_heads, q_len, d) ->
    ((N, q_len, heads, d), None). The state comes from the enclosing cascade_implementation (some models do not
    pass extra forward kwargs down to their attention function)."""
    state = _ACTIVE[-1]
    opts = attention_options(module, kwargs, "generate_groups")
    if dropout:
        raise UnsupportedModelError(f"{type(module).__name__} applies attention dropout {dropout} in generate_groups")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = module.layer_idx
    if state.mode == "prefill":
        state.store_prefix(layer, key, value)
        return _prefill(query, key, value, scaling, opts).transpose(1, 2).contiguous(), None
    return _decode(state, layer, query, key, value, scaling, opts), None


AttentionInterface.register(CASCADE, cascade_attention)


@contextlib.contextmanager
def cascade_implementation(model, state: CascadeState):
    """Routes the model's attention through `cascade_attention` with `state` for the duration (inference only).
    The name is not a registered mask function, so transformers builds no mask for it."""
    if not routes_through_interface(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} computes attention in its own code, not through "
            "transformers' AttentionInterface, so the cascade cannot serve it"
        )
    previous = model.config._attn_implementation
    model.config._attn_implementation = CASCADE
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.pop()
        model.config._attn_implementation = previous
