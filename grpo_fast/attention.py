"""Attention for the shared-prefix engine (DESIGN.md, "Shared prefix"): packed-row masks for training and the
cascade attention that rollouts decode with.

Training rows are `[P | C1 | ... | CG]`, described by a segment id per token: 0 for the prompt, i for the
tokens of completion i, -1 for the padding at the end of a row. A token keeps
`keep(q, kv) = kv <= q and (seg[kv] == 0 or seg[kv] == seg[q])`: causal within its own completion and over
the whole prompt. Padding queries see the prompt and earlier padding, so no softmax row is empty (an empty
row is NaN in SDPA, and NaN * 0 in backward would still poison the gradients).

Rollouts register one attention function with transformers' `AttentionInterface`; it runs in two modes:
`prefill` (batch 1, one prompt: causal SDPA, and the prompt's K/V are copied into a (B, kv_heads, Lp, d)
buffer, once per prompt) and `decode` (B*G rows, one token each: attention over the shared prompt K/V and
over the row's own K/V, merged by log-sum-exp). Its buffers are preallocated, so a decode step has static
shapes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

BACKENDS = ("auto", "sdpa", "flex")
CASCADE = "grpo_fast_cascade"
_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "flex_attention"}


def resolve_backend(attention: str, device: torch.device) -> str:
    """`auto` is FlexAttention on CUDA (sparse blocks skipped) and SDPA with a dense mask elsewhere: FlexAttention
    has no CPU backward."""
    if attention not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {attention!r}")
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attention


def set_backend(config, backend: str) -> None:
    """Points the model's attention at `backend`, persistently: gradient checkpointing recomputes attention during
    backward, after any context manager around the forward would have exited."""
    if config._attn_implementation != _IMPLEMENTATION[backend]:
        config._attn_implementation = _IMPLEMENTATION[backend]


def packed_mask(segments: torch.Tensor, backend: str):
    """The shared-prefix mask of packed rows. segments (R, L) int -> bool (R, 1, L, L) (True = attend) for SDPA,
    or a FlexAttention BlockMask (O(R * L^2 / 128^2) bytes instead of R * L^2)."""
    R, L = segments.shape
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            seg_kv = segments[b, kv]
            return (kv <= q) & ((seg_kv == 0) | (seg_kv == segments[b, q]))

        return create_block_mask(mask_mod, B=R, H=None, Q_LEN=L, KV_LEN=L, device=segments.device)
    idx = torch.arange(L, device=segments.device)
    causal = idx[None, :] <= idx[:, None]  # (L, L)
    same = segments[:, :, None] == segments[:, None, :]  # (R, L, L)
    keep = causal & (same | (segments == 0)[:, None, :])
    return keep[:, None]  # (R, 1, L, L)


@dataclass
class CascadeState:
    """Rollout K/V: per layer, the prompts' K/V once (B, kv_heads, Lp_max, d) and every row's own K/V
    (B*G, kv_heads, max_new, d). Rows b*G .. b*G+G-1 belong to prompt b."""

    prompt_lengths: torch.Tensor  # (B,) long
    group_size: int
    max_new: int
    mode: str = "prefill"
    prompt: int = 0  # the prompt being prefilled
    step: torch.Tensor | None = None  # 0-d long: the own-KV slot the decoded token writes
    prefix_k: dict = field(default_factory=dict)
    prefix_v: dict = field(default_factory=dict)
    own_k: dict = field(default_factory=dict)
    own_v: dict = field(default_factory=dict)

    def store_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer not in self.prefix_k:
            B, Lp = self.prompt_lengths.numel(), int(self.prompt_lengths.max())
            shape = (B, k.shape[1], Lp, k.shape[3])
            self.prefix_k[layer] = k.new_zeros(shape)
            self.prefix_v[layer] = v.new_zeros(shape)
        self.prefix_k[layer][self.prompt, :, : k.shape[2]] = k[0]
        self.prefix_v[layer][self.prompt, :, : v.shape[2]] = v[0]

    def store_own(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.own_k:
            shape = (k.shape[0], k.shape[1], self.max_new, k.shape[3])
            self.own_k[layer] = k.new_zeros(shape)
            self.own_v[layer] = v.new_zeros(shape)
        self.own_k[layer].index_copy_(2, self.step.view(1), k)
        self.own_v[layer].index_copy_(2, self.step.view(1), v)
        return self.own_k[layer], self.own_v[layer]


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scaling: float, softcap=None):
    """Softmax attention and its log-sum-exp. q (..., M, d), k/v (..., S, d), keep broadcast to (..., M, S).
    softcap c (Gemma 2's attn_logit_softcapping): scores = c * tanh(scores / c), as the model's eager attention."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling  # (..., M, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (..., M, 1)
    out = torch.matmul(torch.exp(scores - lse).to(v.dtype), v).float()  # (..., M, d)
    return out, lse


def _decode(state: CascadeState, layer: int, q, k, v, scaling: float, softcap=None) -> torch.Tensor:
    N, h, _, d = q.shape  # (B*G, heads, 1, d)
    B, G, kvh = N // state.group_size, state.group_size, k.shape[1]
    r = h // kvh
    # The prefix pass reads each prompt's K/V once for its G rows: the G*r queries of a kv head are one batch.
    qp = q.reshape(B, G, kvh, r, d).transpose(1, 2).reshape(B, kvh, G * r, d)
    pk, pv = state.prefix_k[layer], state.prefix_v[layer]  # (B, kvh, Lp_max, d)
    in_prompt = torch.arange(pk.shape[2], device=q.device) < state.prompt_lengths[:, None]  # (B, Lp_max)
    o1, l1 = _partial(qp, pk, pv, in_prompt[:, None, None, :], scaling, softcap)  # (B, kvh, G*r, d)
    o1 = o1.view(B, kvh, G, r, d).transpose(1, 2).reshape(N, kvh, r, d)
    l1 = l1.view(B, kvh, G, r, 1).transpose(1, 2).reshape(N, kvh, r, 1)
    ok, ov = state.store_own(layer, k, v)  # (N, kvh, max_new, d)
    seen = torch.arange(state.max_new, device=q.device) <= state.step  # (max_new,)
    o2, l2 = _partial(q.reshape(N, kvh, r, d), ok, ov, seen, scaling, softcap)  # (N, kvh, r, d)
    lse = torch.logaddexp(l1, l2)
    out = o1 * torch.exp(l1 - lse) + o2 * torch.exp(l2 - lse)  # (N, kvh, r, d)
    return out.reshape(N, 1, h, d).to(q.dtype)


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query (N, heads, q_len, d), key/value (N, kv_heads, q_len, d) ->
    ((N, q_len, heads, d), None)."""
    state: CascadeState = kwargs["grpo_cascade"]
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("generate_groups does not support sliding-window attention layers")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer, softcap = module.layer_idx, kwargs.get("softcap")
    if state.mode == "prefill":
        state.store_prefix(layer, key, value)
        if softcap is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        else:  # SDPA cannot softcap its scores: the causal prefill by hand (batch 1, once per prompt)
            r, L = query.shape[1] // key.shape[1], query.shape[2]
            causal = torch.ones(L, L, dtype=torch.bool, device=query.device).tril()
            k, v = key.repeat_interleave(r, dim=1), value.repeat_interleave(r, dim=1)  # (1, heads, L, d)
            out = _partial(query, k, v, causal, scaling, softcap)[0].to(query.dtype)
        return out.transpose(1, 2).contiguous(), None
    return _decode(state, layer, query, key, value, scaling, softcap), None


AttentionInterface.register(CASCADE, cascade_attention)


@contextlib.contextmanager
def cascade_implementation(config):
    """Routes the model's attention through `cascade_attention` for the duration (inference only). The name is
    not a registered mask function, so transformers builds no mask for it."""
    previous = config._attn_implementation
    config._attn_implementation = CASCADE
    try:
        yield
    finally:
        config._attn_implementation = previous
