"""Rollouts that prefill each prompt once (DESIGN.md, "Shared prefix").

`generate(num_return_sequences=G)` prefills every prompt G times and keeps G copies of its K/V. Here each
prompt runs once at batch 1, its K/V is kept once, and the group's G rows decode against it through cascade
attention (grpo_fast/cascade.py): a prompt of Lp tokens costs Lp token-forwards and Lp K/V slots per layer
instead of G * Lp. Decode buffers are preallocated (static shapes per step) and the host checks whether every
row has finished only every `_CHECK_EVERY` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import checks, guard
from .cascade import CascadeState, cascade_implementation
from .logit_head import logit_transform
from .packing import causal_lm, check_group_size, check_prompts, decoder_stack, lm_head, position_limit

_CHECK_EVERY = 8  # decode steps between host syncs that test "all rows finished"


@dataclass
class Rollout:
    """G sampled completions per prompt; rows b*G .. b*G+G-1 belong to prompts[b]."""

    prompts: list[torch.Tensor]  # B unpadded 1-D LongTensors
    group_size: int
    completion_ids: torch.Tensor  # (B*G, Tc) long, pad_token_id after EOS
    completion_mask: torch.Tensor  # (B*G, Tc) long, 1 up to and including EOS
    completion_lengths: torch.Tensor  # (B*G,) long, completion_mask.sum(1)
    finished: torch.Tensor  # (B*G,) bool: the row ended with EOS (else it was cut at max_new_tokens)
    pad_token_id: int


def _token_ids(value, fallback, name: str) -> list[int]:
    value = fallback if value is None else value
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return ids


def _check_sampling(max_new_tokens, temperature, top_p, top_k, generator, device) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}")


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """top-k, then nucleus (top-p) filtering of (N, V) fp32 logits, as in transformers' logits warpers."""
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


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """One token per row of (N, V) fp32 logits, each row drawn independently; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filter(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (N,)


def _logits(hidden: torch.Tensor, head: tuple) -> torch.Tensor:
    """The model's next-token logits (N, V) fp32 from final hidden states (N, H): head = (weight, bias, transform),
    the transform (logit scale, softcap) applied as the model's forward does, before any temperature."""
    weight, bias, transform = head
    return transform(F.linear(hidden, weight, bias).float())


def _prefill(decoder, head, prompts, state: CascadeState) -> torch.Tensor:
    """Runs each prompt once (batch 1), storing its K/V in `state`; returns the next-token logits (B, V) fp32."""
    state.mode, last = "prefill", []
    for b, p in enumerate(prompts):
        state.prompt = b
        positions = torch.arange(p.numel(), device=p.device)[None]
        out = decoder(input_ids=p[None], position_ids=positions, use_cache=False)
        last.append(out.last_hidden_state[0, -1])  # (H,)
    return _logits(torch.stack(last), head)


def _decode_step(decoder, head, tokens, positions, state: CascadeState, step: int) -> torch.Tensor:
    """Feeds one token per row (N,) at `positions` (N,); returns the next-token logits (N, V) fp32."""
    state.mode = "decode"
    state.step = torch.tensor(step, device=tokens.device)
    out = decoder(input_ids=tokens[:, None], position_ids=positions[:, None], use_cache=False)
    return _logits(out.last_hidden_state[:, -1], head)


class NonFiniteLogits(ValueError):
    """The model's next-token logits hold NaN or +inf (or are all -inf): nothing can be sampled."""


def _decode(decoder, head, logits, positions, state, eos, pad, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples up to state.max_new tokens per row. Returns tokens (N, T) (pad after EOS) and done-before (N, T).
    Raises NonFiniteLogits at the end if any row's logits were not finite (checked on device, no sync per token)."""
    N, dev = logits.shape[0], logits.device
    eos_ids = torch.tensor(eos, dtype=torch.long, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    bad = torch.zeros(N, dtype=torch.bool, device=dev)
    tokens, was_done = [], []
    for t in range(state.max_new):
        bad |= ~torch.isfinite(logits.amax(-1))  # amax is NaN for any NaN, +inf for any +inf, -inf if all are
        logits = torch.where(bad.unsqueeze(1), 0.0, logits)  # keeps multinomial valid (a device assert on CUDA)
        tok = torch.where(done, pad, _sample(logits, *sampling))  # (N,)
        tokens.append(tok)
        was_done.append(done)
        done = done | torch.isin(tok, eos_ids)
        if t + 1 == state.max_new or ((t + 1) % _CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = _decode_step(decoder, head, tok, positions + t, state, t)
    if bool(bad.any()):
        raise NonFiniteLogits(
            f"generate_groups: the model's next-token logits are NaN or infinite for {int(bad.sum())} of {N} rows "
            "(non-finite weights, or an overflow in the forward)"
        )
    return torch.stack(tokens, 1), torch.stack(was_done, 1)


@torch.no_grad()
def generate_groups(
    model,
    prompts: list[torch.Tensor],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Samples `group_size` completions of up to `max_new_tokens` tokens for each of the B `prompts` (unpadded
    1-D LongTensors on the model's device), each prompt prefilled once and its K/V stored once.

    Every row draws independently from `generator` (temperature 0: greedy; top_k 0 and top_p 1: no filtering)
    from the model's own logits (its logit scale and softcap applied, logit_head.py, before the temperature)
    and stops at any of `eos_token_id` (default: the model's generation config). Returns a Rollout with
    completion_ids / completion_mask (B*G, Tc), Tc the longest completion; works on peft-wrapped models.
    """
    base = causal_lm(model)
    check_group_size(group_size)
    weight, bias = lm_head(model)
    head = (weight, bias, logit_transform(model))
    _check_sampling(max_new_tokens, temperature, top_p, top_k, generator, weight.device)
    limit = position_limit(model)
    lengths = check_prompts(prompts, weight.shape[0], weight.device, limit)
    if limit is not None and max(lengths) + max_new_tokens > limit:
        raise ValueError(f"prompt + max_new_tokens={max_new_tokens} exceeds the model's position limit {limit}")
    gen_config = getattr(base, "generation_config", None)
    eos = _token_ids(eos_token_id, getattr(gen_config, "eos_token_id", None), "eos_token_id")
    pads = _token_ids(pad_token_id, getattr(gen_config, "pad_token_id", None), "pad_token_id")
    pad = pads[0] if pads else (eos[0] if eos else 0)
    checks.ids_in_range(torch.tensor(eos + [pad]), weight.shape[0], "eos_token_id/pad_token_id")
    guard.check_model(model, "rollouts")  # once per model: the cascade must equal the model's own forward

    dev, G = weight.device, group_size
    state = CascadeState(torch.tensor(lengths, device=dev), G, max_new_tokens)
    positions = state.prompt_lengths.repeat_interleave(G)  # (B*G,) position of each row's first new token
    was_training = base.training
    base.eval()  # no dropout (LoRA's included) while sampling
    try:
        with cascade_implementation(base, state):
            decoder = decoder_stack(base)
            logits = _prefill(decoder, head, prompts, state).repeat_interleave(G, dim=0)  # (B*G, V)
            sampling = (temperature, top_k, top_p, generator)
            tokens, was_done = _decode(decoder, head, logits, positions, state, eos, pad, sampling)
    finally:
        base.train(was_training)
    mask = (~was_done).long()  # (B*G, T)
    completion_lengths = mask.sum(1)
    Tc = max(int(completion_lengths.max()), 1)
    finished = torch.isin(tokens, torch.tensor(eos, dtype=torch.long, device=dev)) & mask.bool()
    return Rollout(list(prompts), G, tokens[:, :Tc], mask[:, :Tc], completion_lengths, finished.any(1), pad)


@torch.no_grad()
def rollout_logps(model, prompts: list[torch.Tensor], completion_ids: torch.Tensor, group_size: int) -> torch.Tensor:
    """Log-probs (B*G, Tc) fp32 of given completions under the rollout engine, teacher-forced: each prompt
    prefilled once, then cascade decode steps fed the given tokens; the distribution generate_groups samples
    from at temperature 1. Internal (no input checks): the guard compares it with the model's own forward."""
    base, head = causal_lm(model), (*lm_head(model), logit_transform(model))
    N, Tc = completion_ids.shape
    lengths = torch.tensor([p.numel() for p in prompts], device=completion_ids.device)
    state = CascadeState(lengths, group_size, Tc)
    positions = lengths.repeat_interleave(group_size)  # (N,)
    with cascade_implementation(base, state):
        decoder = decoder_stack(base)
        steps = [_prefill(decoder, head, prompts, state).repeat_interleave(group_size, dim=0)]  # (N, V)
        for t in range(Tc - 1):
            steps.append(_decode_step(decoder, head, completion_ids[:, t], positions + t, state, t))
    logits = torch.stack(steps, 1)  # (N, Tc, V)
    return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)
