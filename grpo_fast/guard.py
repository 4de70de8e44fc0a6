"""The guard (DESIGN.md, "Architectures"): no model trains or samples through the engine unless the engine's
log-probs equal the model's own forward on a short sample, so an architecture nobody tested (or one added to
transformers later) is refused instead of being trained silently wrong.

On first use of a model object (sequence_logps, completion_hidden_states, generate_groups, the trainer before
step 1) it scores one prompt and G=2 completions (5 and 3 tokens, random ids from a fixed generator; the
model in eval mode, no grad, global RNG untouched) three ways:
- reference: log_softmax of the model's own forward logits on each row [P | Ci] alone, with transformers'
  eager attention (the implementation every architecture defines, sinks and soft-capping included);
- "training": sequence_logps, the shared-prefix packed forward;
- "rollouts": rollout_logps, the prompt prefilled once and the completions decoded through the cascade.
A half whose largest |log-prob difference| exceeds TOLERANCE (or that raises UnsupportedModelError) is refused
with the architecture and the size of the mismatch; the verdicts are cached per model object.

The prompt is SAMPLE_PROMPT tokens, or the model's smallest sliding window + 3 when that is at most
MAX_WINDOW_SAMPLE tokens, so that completions see the prompt through the window (larger windows are checked by
tests/test_model_coverage.py with small windows, not here). Cost: 4 forwards of about Lp + 5 tokens and 4
decode steps (0.15 s for a tiny Llama; about 11 s for a 0.5B model in fp32 on 2 CPU cores).
"""

from __future__ import annotations

import weakref

import torch

from . import packing, rollout
from .attention import UnsupportedModelError

HALVES = ("training", "rollouts")
# Max |log-prob difference| accepted, by the model's dtype. fp32: the exact engine and the reference differ only
# in summation order (below 1e-5 on the matrix's 30 tiny configs and on a Qwen2.5-0.5B-shaped config), while an
# unsupported feature (a missed window, sink or logit transform) moves log-probs by 1e-2 or more. bf16: rounding
# alone reaches 0.036 on those tiny configs (at 10x init scale) and 0.029 on the 0.5B shape, hence 0.1; smaller
# errors of a bf16 model go unseen here (tests/test_model_coverage.py checks the known features in fp32).
TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}
SAMPLE_PROMPT = 12
MAX_WINDOW_SAMPLE = 512
COMPLETIONS = (5, 3)

_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> {half: refusal or None}
_CHECKING: weakref.WeakSet = weakref.WeakSet()  # models whose guard is running (its own engine calls pass)


def check_model(model, *halves: str) -> None:
    """Raises UnsupportedModelError (a ValueError) if the engine's `halves` ("training", "rollouts"; default
    both) do not reproduce the model's own forward. The comparison runs once per model object."""
    base = packing.causal_lm(model)
    if base in _CHECKING:
        return
    if base not in _VERDICTS:
        found = verdicts(model)
        if found is None:  # the model's own forward is not finite: nothing to compare; its NaN shows in our output
            return
        _VERDICTS[base] = found
    for half in halves or HALVES:
        if _VERDICTS[base][half] is not None:
            raise UnsupportedModelError(_VERDICTS[base][half])


def _sample(base, weight: torch.Tensor):
    """One prompt (Lp,) and completions (2, 5) with their mask, random ids on the head's device."""
    window = getattr(base.config, "sliding_window", None)
    Lp = SAMPLE_PROMPT
    if isinstance(window, int) and 0 < window <= MAX_WINDOW_SAMPLE:
        Lp = max(Lp, window + 3)
    limit = packing.position_limit(base)
    if limit is not None:
        Lp = max(1, min(Lp, limit - max(COMPLETIONS)))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, weight.shape[0], (Lp,), generator=gen).to(weight.device)
    ids = torch.randint(0, weight.shape[0], (len(COMPLETIONS), max(COMPLETIONS)), generator=gen).to(weight.device)
    mask = (torch.arange(ids.shape[1]) < torch.tensor(COMPLETIONS)[:, None]).long().to(weight.device)
    return prompt, ids, mask


def reference_logps(base, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(rows, Tc) fp32 log-probs from the model's own forward on each row [P | Ci] under eager attention."""
    previous, out = base.config._attn_implementation, torch.zeros(ids.shape, device=ids.device)
    base.config._attn_implementation = "eager"
    try:
        for r in range(ids.shape[0]):
            n, Lp = int(mask[r].sum()), prompt.numel()
            logits = base(input_ids=torch.cat([prompt, ids[r, :n]])[None], use_cache=False).logits
            logps = torch.log_softmax(logits[0, Lp - 1 : -1].float(), -1)  # (n, V)
            out[r, :n] = logps.gather(-1, ids[r, :n, None]).squeeze(-1)
    finally:
        base.config._attn_implementation = previous
    return out


def _compare(base, what: str, engine, ref: torch.Tensor, mask: torch.Tensor) -> str | None:
    """None if `engine()` matches `ref` within the tolerance, else the refusal message."""
    arch = f"{type(base).__name__} (model_type {getattr(base.config, 'model_type', '?')!r})"
    try:
        got = engine()
    except UnsupportedModelError as e:
        return f"{arch} is not supported by the {what}: {e}"
    except Exception as e:  # an architecture the engine does not know can fail anywhere: refuse it, with the cause
        return f"{arch} is not supported by the {what}: it fails there with {type(e).__name__}: {e}"
    dtype = packing.lm_head(base)[0].dtype
    tol = TOLERANCE.get(dtype, 0.1)
    diff = float((got.float() - ref).abs()[mask.bool()].max()) if bool(got.isfinite().all()) else float("inf")
    if diff <= tol:
        return None
    return (
        f"{arch} is not supported by the {what}: its log-probs differ from the model's own forward by {diff:.3g} "
        f"(max over a {int(mask.sum())}-token check sample; tolerance {tol:g} in {dtype})"
    )


@torch.no_grad()
def verdicts(model) -> dict[str, str | None] | None:
    """Runs the comparison (uncached): {half: None if exact, else the refusal message}; None (no verdict, checked
    again on the next use) when the model's own forward is not finite on the sample (e.g. NaN weights)."""
    base = packing.causal_lm(model)
    prompt, ids, mask = _sample(base, packing.lm_head(base)[0])
    was_training = base.training
    base.eval()  # no dropout, deterministic MoE routing
    _CHECKING.add(base)
    try:
        ref = reference_logps(base, prompt, ids, mask)
        if not bool(ref[mask.bool()].isfinite().all()):
            return None
        train = lambda: packing.sequence_logps(model, [prompt], ids, mask, group_size=len(COMPLETIONS))  # noqa: E731
        roll = lambda: rollout.rollout_logps(model, [prompt], ids, len(COMPLETIONS))  # noqa: E731
        return {
            "training": _compare(base, "packed training forward (sequence_logps)", train, ref, mask),
            "rollouts": _compare(base, "rollout engine (generate_groups)", roll, ref, mask),
        }
    finally:
        _CHECKING.discard(base)
        base.train(was_training)
