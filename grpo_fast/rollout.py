"""Rollouts that prefill each prompt once (DESIGN.md, "Shared prefix").

`generate(num_return_sequences=G)` prefills every prompt G times and keeps G copies of its K/V. Here each
prompt runs once at batch 1, its K/V is kept once, and the group's G rows decode against it through cascade
attention (grpo_fast/cascade.py): a prompt of Lp tokens costs Lp token-forwards and Lp K/V slots per layer
instead of G * Lp. The per-token decode step (decode.py) has static shapes and no host sync: it compiles whole
and, on CUDA, replays as a CUDA graph; its sampling noise comes from the seeded generator up front (sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks, guard
from .cascade import CascadeState, cascade_implementation
from .decode import DecodeBuffers, decode, head_logits, next_logits
from .logit_head import logit_transform
from .packing import causal_lm, check_group_size, check_prompts, decoder_stack, lm_head, position_limit
from .sampling import draw_noise


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
    logps: torch.Tensor | None = None  # (B*G, Tc) fp32 sampled tokens' log_softmax(logits / T), 0 where masked


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


def _check_options(return_logps, compile_decode, temperature) -> None:
    if not isinstance(return_logps, bool):
        raise TypeError(f"return_logps must be a bool, got {type(return_logps).__name__}")
    if compile_decode is not None and not isinstance(compile_decode, bool):
        raise TypeError(f"compile_decode must be a bool or None, got {type(compile_decode).__name__}")
    if return_logps and temperature == 0:
        raise ValueError(
            "return_logps needs temperature > 0: greedy decoding (temperature 0) samples from no distribution"
        )


def _prefill(decoder, head, prompts, state: CascadeState) -> torch.Tensor:
    """Runs each prompt once (batch 1), storing its K/V in `state`; returns the next-token logits (B, V) fp32."""
    state.mode, last = "prefill", []
    for b, p in enumerate(prompts):
        state.prompt = b
        positions = torch.arange(p.numel(), device=p.device)[None]
        out = decoder(input_ids=p[None], position_ids=positions, use_cache=False)
        last.append(out.last_hidden_state[0, -1])  # (H,)
    state.mode = "decode"
    return head_logits(torch.stack(last), head)


class NonFiniteLogits(ValueError):
    """The model's next-token logits hold NaN or +inf (or are all -inf): nothing can be sampled."""


def _special_ids(base, eos_token_id, pad_token_id, vocab_size: int) -> tuple[list[int], int]:
    """The EOS ids (default: the model's generation config) and the pad id (default: its pad, else the first EOS)."""
    gen_config = getattr(base, "generation_config", None)
    eos = _token_ids(eos_token_id, getattr(gen_config, "eos_token_id", None), "eos_token_id")
    pads = _token_ids(pad_token_id, getattr(gen_config, "pad_token_id", None), "pad_token_id")
    pad = pads[0] if pads else (eos[0] if eos else 0)
    checks.ids_in_range(torch.tensor(eos + [pad]), vocab_size, "eos_token_id/pad_token_id")
    return eos, pad


def _result(prompts, G: int, buf: DecodeBuffers, pad: int) -> Rollout:
    """The Rollout of filled decode buffers, trimmed to the longest completion; NonFiniteLogits if any row's logits
    were not finite (flagged on device, checked here once)."""
    if bool(buf.bad.any()):
        raise NonFiniteLogits(
            f"generate_groups: the model's next-token logits are NaN or infinite for {int(buf.bad.sum())} of "
            f"{buf.bad.numel()} rows (non-finite weights, or an overflow in the forward)"
        )
    mask = (~buf.was_done).long()  # (B*G, T)
    completion_lengths = mask.sum(1)
    Tc = max(int(completion_lengths.max()), 1)
    finished = torch.isin(buf.tokens, buf.eos) & mask.bool()
    logps = None if buf.logps is None else buf.logps[:, :Tc]
    ids, mask = buf.tokens[:, :Tc], mask[:, :Tc]
    return Rollout(list(prompts), G, ids, mask, completion_lengths, finished.any(1), pad, logps)


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
    return_logps: bool = False,
    compile_decode: bool | None = None,
) -> Rollout:
    """Samples `group_size` completions of up to `max_new_tokens` tokens for each of the B `prompts` (unpadded
    1-D LongTensors on the model's device), each prompt prefilled once and its K/V stored once.

    Every row draws independently (temperature 0: greedy; top_k 0 and top_p 1: no filtering) from the model's own
    logits (its logit scale and softcap applied, logit_head.py, before the temperature), with noise drawn from
    `generator` up front (sampling.py), and stops at any of `eos_token_id` (default: the model's generation
    config). Returns a Rollout with completion_ids / completion_mask (B*G, Tc), Tc the longest completion; works on
    peft-wrapped models.

    return_logps: also fill Rollout.logps (B*G, Tc) fp32, the log-prob of each sampled token under
        log_softmax(logits / temperature) of the model's own, unfiltered logits (top-k / top-p decide what is
        drawn, not this): the quantity the training forward computes (`sequence_logps`), 0 where masked. Computed
        inside the decode step from the logits it already holds; needs temperature > 0.
    compile_decode: run each decode step as one `torch.compile(fullgraph=True)` graph, replayed as a CUDA graph on
        CUDA (decode.py). None: on for CUDA, off on CPU (compiling costs more there than a rollout saves). The
        tokens equal the eager decode's for the same generator; a model whose step cannot compile whole decodes
        eagerly after one logged warning naming the reason.
    """
    base = causal_lm(model)
    check_group_size(group_size)
    weight, bias = lm_head(model)
    head = (weight, bias, logit_transform(model))
    _check_sampling(max_new_tokens, temperature, top_p, top_k, generator, weight.device)
    _check_options(return_logps, compile_decode, temperature)
    limit = position_limit(model)
    lengths = check_prompts(prompts, weight.shape[0], weight.device, limit)
    if limit is not None and max(lengths) + max_new_tokens > limit:
        raise ValueError(f"prompt + max_new_tokens={max_new_tokens} exceeds the model's position limit {limit}")
    eos, pad = _special_ids(base, eos_token_id, pad_token_id, weight.shape[0])
    guard.check_model(model, "rollouts")  # once per model: the cascade must equal the model's own forward

    dev, G, N = weight.device, group_size, len(prompts) * group_size
    if temperature > 0:
        noise = draw_noise(generator, max_new_tokens, N, dev)
    else:  # argmax reads no noise
        noise = torch.zeros(max_new_tokens, N, dtype=torch.float64, device=dev)
    state = CascadeState(torch.tensor(lengths, device=dev), G, max_new_tokens)
    positions = state.prompt_lengths.repeat_interleave(G)  # (B*G,) position of each row's first new token
    buf = DecodeBuffers.allocate(positions, noise, eos, pad, return_logps)
    state.step = buf.step  # the own-K/V slot the step writes is the column it feeds
    compiled = dev.type == "cuda" if compile_decode is None else compile_decode
    was_training = base.training
    base.eval()  # no dropout (LoRA's included) while sampling
    try:
        with cascade_implementation(base, state):
            decoder = decoder_stack(base)
            logits = _prefill(decoder, head, prompts, state).repeat_interleave(G, dim=0)  # (B*G, V)
            decode(base, decoder, head, buf, logits, (temperature, top_k, top_p), compiled)
    finally:
        base.train(was_training)
    return _result(prompts, G, buf, pad)


@torch.no_grad()
def rollout_logps(model, prompts: list[torch.Tensor], completion_ids: torch.Tensor, group_size: int) -> torch.Tensor:
    """Log-probs (B*G, Tc) fp32 of given completions under the rollout engine, teacher-forced: each prompt
    prefilled once, then cascade decode steps (eager) fed the given tokens; the distribution generate_groups
    samples from at temperature 1. Internal (no input checks): the guard compares it with the model's own forward."""
    base, head = causal_lm(model), (*lm_head(model), logit_transform(model))
    N, Tc = completion_ids.shape
    lengths = torch.tensor([p.numel() for p in prompts], device=completion_ids.device)
    state = CascadeState(lengths, group_size, Tc)
    positions = lengths.repeat_interleave(group_size)  # (N,)
    with cascade_implementation(base, state):
        decoder = decoder_stack(base)
        steps = [_prefill(decoder, head, prompts, state).repeat_interleave(group_size, dim=0)]  # (N, V)
        for t in range(Tc - 1):
            state.step.fill_(t)
            steps.append(next_logits(decoder, head, completion_ids[:, t], positions + t))
    logits = torch.stack(steps, 1)  # (N, Tc, V)
    return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)
