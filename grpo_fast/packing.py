"""The shared-prefix training forward (DESIGN.md, "Shared prefix"): each group of G completions of one prompt
is packed as one row `[P | C1 | ... | CG]` and run once through the decoder under the shared-prefix mask.

Positions are 0..Lp-1 for P and restart at Lp for every Ci; the hidden state that scores Ci's first token is
P's last one, and Ci's last token (usually EOS) is never an input, so a group costs Lp + sum(len(Ci) - 1)
tokens instead of G * (Lp + Tc). Autograd sums the G completions' gradients into the prompt's activations,
which equals G separate rows. The decoder's final (normed) hidden states go straight into
`fused_linear_logps` with the LM head: the (tokens, V) logits are never formed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import checks
from .attention import (
    LEGACY_NAMES,
    PACKED,
    PackedMasks,
    UnsupportedModelError,
    packed_mask,
    resolve_backend,
    routes_through_interface,
    use_implementation,
)
from .logit_head import logit_transform

PAD_SEGMENT = -1


def causal_lm(model):
    """The transformers causal LM inside `model` (a peft wrapper keeps its LoRA layers injected there)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_stack(model):
    """The decoder stack (embeddings, layers, final norm) of the causal LM inside `model`."""
    base = causal_lm(model)
    inner = base.get_decoder()
    return getattr(base, "model", inner) if inner is base else inner  # e.g. Llama4ForCausalLM returns itself


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (V, H) weight and (V,) bias or None."""
    if not hasattr(causal_lm(model), "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM (or a peft model of one), got {type(model).__name__}")
    head = causal_lm(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"model ({type(model).__name__}) has no linear output embedding (LM head)")
    return head.weight, getattr(head, "bias", None)


def check_prompts(prompts, vocab_size: int, device: torch.device, limit: int | None) -> list[int]:
    """prompts: a non-empty list of non-empty 1-D int tensors on the model's device. Returns their lengths."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of 1-D LongTensors, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        checks.tensor(p, f"prompts[{i}]", ndim=1)
        if p.numel() == 0:
            raise ValueError(f"prompts[{i}] is empty")
        checks.ids_in_range(p, vocab_size, f"prompts[{i}]")
        if p.device != device:
            raise ValueError(f"prompts[{i}] is on {p.device} but the model is on {device}")
        if limit is not None and p.numel() > limit:
            raise ValueError(f"prompts[{i}] has {p.numel()} tokens, above the model's position limit {limit}")
    return [p.numel() for p in prompts]


def check_group_size(group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def position_limit(model) -> int | None:
    return getattr(causal_lm(model).config, "max_position_embeddings", None)


def check_completions(completion_ids, completion_mask, rows: int, vocab_size: int, device) -> torch.Tensor:
    """(rows, Tc) ids and a mask of 1s then 0s per row; returns the completion lengths (rows,) long."""
    checks.tensor(completion_ids, "completion_ids", ndim=2)
    checks.tensor(completion_mask, "completion_mask", ndim=2)
    if completion_ids.shape[0] != rows:
        raise ValueError(
            f"completion_ids has {completion_ids.shape[0]} rows, expected len(prompts) * group_size = {rows}"
        )
    checks.shape(completion_mask, "completion_mask", tuple(completion_ids.shape))
    checks.ids_in_range(completion_ids, vocab_size, "completion_ids")
    checks.same_device("completion_ids", completion_ids, ("completion_mask", completion_mask))
    if completion_ids.device != device:
        raise ValueError(f"completion_ids is on {completion_ids.device} but the model is on {device}")
    checks.binary_mask(completion_mask, "completion_mask")  # before .long(), which would truncate 0.5 to 0
    mask = completion_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()) or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        raise ValueError("completion_mask must hold 1s then 0s in each row (1 up to and including EOS)")
    return mask.sum(1)


@dataclass
class Packed:
    """Packed decoder inputs, (R, L) each, and where each completion token is scored: the hidden state at flat
    index `src` of (R*L) scores the token at flat index `dst` of (rows*Tc)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def _segment(ids: torch.Tensor, start_pos: int, seg: int, first_scorer: int, offset: int, length: int):
    """One completion of `length` tokens whose inputs (all but its last token) sit at `offset` of the row.
    Returns (inputs, positions, segments, scorers): token j is scored at `first_scorer` for j = 0, else at
    offset + j - 1."""
    n = max(length - 1, 0)
    pos = torch.arange(start_pos, start_pos + n, device=ids.device)
    scorers = torch.cat([torch.tensor([first_scorer], device=ids.device), offset + torch.arange(n, device=ids.device)])
    return ids[:n], pos, torch.full((n,), seg, device=ids.device), scorers[:length]


def _rows(prompts, completion_ids, lengths: list[int], group_size: int, shared_prefix: bool):
    """Yields (pieces, sources, destinations) per packed row: pieces are (ids, positions, segments) chunks."""
    Tc = completion_ids.shape[1]
    for b, p in enumerate(prompts):
        Lp, dev = p.numel(), p.device
        prompt_piece = (p, torch.arange(Lp, device=dev), torch.zeros(Lp, dtype=torch.long, device=dev))
        members = [list(range(b * group_size, (b + 1) * group_size))]
        if not shared_prefix:
            members = [[r] for r in members[0]]
        for rows in members:
            pieces, src, dst, offset = [prompt_piece], [], [], Lp
            for i, r in enumerate(rows):
                ids, pos, seg, scorers = _segment(completion_ids[r], Lp, i + 1, Lp - 1, offset, lengths[r])
                pieces.append((ids, pos, seg))
                src.append(scorers)
                dst.append(r * Tc + torch.arange(lengths[r], device=dev))
                offset += ids.numel()
            yield pieces, torch.cat(src), torch.cat(dst)


def pack(prompts, completion_ids, lengths: list[int], group_size: int, shared_prefix: bool = True) -> Packed:
    """Packs groups into rows (one per group, or one per completion when not shared), padded at the end."""
    built = list(_rows(prompts, completion_ids, lengths, group_size, shared_prefix))
    L = max(sum(piece[0].numel() for piece in pieces) for pieces, _, _ in built)
    R, dev = len(built), completion_ids.device
    input_ids = torch.zeros(R, L, dtype=torch.long, device=dev)  # pad id 0: any valid id, never scored
    position_ids = torch.zeros(R, L, dtype=torch.long, device=dev)
    segments = torch.full((R, L), PAD_SEGMENT, dtype=torch.long, device=dev)
    srcs, dsts = [], []
    for row, (pieces, src, dst) in enumerate(built):
        n = sum(piece[0].numel() for piece in pieces)
        input_ids[row, :n] = torch.cat([piece[0] for piece in pieces])
        position_ids[row, :n] = torch.cat([piece[1] for piece in pieces])
        segments[row, :n] = torch.cat([piece[2] for piece in pieces])
        srcs.append(row * L + src)
        dsts.append(dst)
    return Packed(input_ids, position_ids, segments, torch.cat(srcs), torch.cat(dsts))


# Models whose attention functions do not receive the decoder's forward kwargs (e.g. StableLM), or that attend in
# their own code rather than through transformers' AttentionInterface (e.g. Falcon): one mask for every layer.
_ONE_MASK = weakref.WeakSet()


def _run(base, packed: Packed, mask, **kwargs) -> torch.Tensor:
    out = decoder_stack(base)(
        input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False, **kwargs
    )
    return out.last_hidden_state  # (R, L, H), after the final norm


def _decoder_hidden(base, packed: Packed, backend: str) -> torch.Tensor:
    """The decoder on packed rows -> (R, L, H). Under the PACKED implementation each layer gets the mask of its
    own window (attention.py). A model whose layers never see the `grpo_packed` kwarg (found on its first
    forward, which is then run again) gets the full mask under SDPA / FlexAttention: exact only without windows."""
    if base not in _ONE_MASK and routes_through_interface(base):
        use_implementation(base.config, PACKED)
        masks = PackedMasks(packed.segments, packed.position_ids, backend)
        hidden = _run(base, packed, masks.get(None), grpo_packed=masks)
        if masks.calls:
            return hidden
    _ONE_MASK.add(base)
    config = base.config
    if getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise UnsupportedModelError(
            f"{type(base).__name__} has sliding-window layers but does not pass forward kwargs down to its attention "
            "function (or attends in its own code): the packed forward cannot give each layer its window"
        )
    use_implementation(config, LEGACY_NAMES[backend])
    return _run(base, packed, packed_mask(packed.segments, packed.position_ids, backend))


def _packed_hidden(model, prompts, completion_ids, completion_mask, group_size, shared_prefix, attention):
    """Checks the inputs (and, once per model, the engine against the model's own forward: guard.py), packs them
    and runs the decoder. Returns ((R*L, H) final hidden states, Packed, lengths)."""
    check_group_size(group_size)
    checks.choice(attention, "attention", ("auto", "sdpa", "flex"))
    weight, _ = lm_head(model)
    limit = position_limit(model)
    Lps = check_prompts(prompts, weight.shape[0], weight.device, limit)
    lengths = check_completions(
        completion_ids, completion_mask, len(prompts) * group_size, weight.shape[0], weight.device
    )
    lengths = lengths.tolist()
    longest = [max(lengths[b * group_size : (b + 1) * group_size]) for b in range(len(prompts))]
    if limit is not None and max(Lp + n for Lp, n in zip(Lps, longest)) > limit:
        raise ValueError(f"prompt + completion is longer than the model's position limit {limit} (completion_ids)")
    from .guard import check_model  # guard.py imports this module

    check_model(model, "training")  # once per model: the packed forward must equal the model's own forward
    packed = pack(prompts, completion_ids, lengths, group_size, shared_prefix)
    backend = resolve_backend(attention, weight.device)
    if backend == "flex" and weight.device.type != "cuda" and torch.is_grad_enabled():
        raise ValueError("attention='flex' needs CUDA here: FlexAttention has no CPU backward; use 'auto' or 'sdpa'")
    hidden = _decoder_hidden(causal_lm(model), packed, backend)
    return hidden.reshape(-1, hidden.shape[-1]), packed, lengths


def completion_hidden_states(
    model,
    prompts: list[torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    group_size: int,
    shared_prefix: bool = True,
    attention: str = "auto",
) -> torch.Tensor:
    """The final hidden state that scores each completion token: (B*G, Tc, H) in the model's dtype, zeros where
    `completion_mask` is 0; differentiable. Feed it with `lm_head(model)` and `logit_transform(model).kwargs()`
    to the fused linear losses.

    prompts: B unpadded 1-D LongTensors; completion_ids, completion_mask: (B*G, Tc), groups of G consecutive
    rows, the mask 1 up to and including EOS. `attention`: "auto" (FlexAttention BlockMask on CUDA, SDPA with a
    dense boolean mask elsewhere), "sdpa" or "flex"; the model is pointed at the engine's attention, persistently
    (attention.py: each layer gets its sliding window; ordinary forwards stay exact). A model the engine cannot
    reproduce raises UnsupportedModelError on first use (guard.py).
    """
    hidden, packed, _ = _packed_hidden(
        model, prompts, completion_ids, completion_mask, group_size, shared_prefix, attention
    )
    rows, Tc = completion_ids.shape
    out = hidden.new_zeros(rows * Tc, hidden.shape[-1])
    return out.index_copy(0, packed.dst, hidden[packed.src]).view(rows, Tc, -1)


def sequence_logps(
    model,
    prompts: list[torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    group_size: int,
    temperature: float = 1.0,
    shared_prefix: bool = True,
    attention: str = "auto",
) -> torch.Tensor:
    """Per-token log-probs log_softmax(logits / temperature)[completion_ids]: (B*G, Tc) float32, 0 where
    `completion_mask` is 0; differentiable w.r.t. the model's parameters. The logits are the model's own:
    its logit scale and softcap (`grpo_fast.logit_head`) apply.

    prompts: B unpadded 1-D LongTensors; completion_ids, completion_mask: (B*G, Tc), groups of G consecutive
    rows. shared_prefix=True packs each group as one row [P | C1 | ... | CG] under the shared-prefix mask;
    False runs G ordinary rows [P | Ci]; both give the same values and gradients. The logits are never
    formed: final hidden states go through `fused_linear_logps` with the LM head, for active tokens only.
    """
    from .fused_linear import fused_linear_logps

    checks.positive_number(temperature, "temperature")
    transform = logit_transform(model)
    hidden, packed, _ = _packed_hidden(
        model, prompts, completion_ids, completion_mask, group_size, shared_prefix, attention
    )
    weight, bias = lm_head(model)
    ids = completion_ids.reshape(-1)[packed.dst]  # (n_active,)
    h = hidden[packed.src]  # (n_active, H)
    logps = fused_linear_logps(h, weight, ids, bias=bias, temperature=temperature, **transform.kwargs())
    rows, Tc = completion_ids.shape
    out = torch.zeros(rows * Tc, dtype=torch.float32, device=logps.device)
    return out.index_copy(0, packed.dst, logps.float()).view(rows, Tc)
