"""Held-out evaluation: greedy (temperature 0) completions through the shared-prefix engine (generate_groups,
one sample per prompt), scored by the run's reward functions.

Metrics: `reward`, the mean weighted total as in training; `reward_<name>_mean` per function over the samples it
scored; `pass_rate`, the fraction of samples that every function declaring a maximum (`max_reward`, see
rewards.py) scored at that maximum, over the samples all of them scored (None when no function declares one).
"""

from __future__ import annotations

import math

import torch

from . import distributed, policy, rewards
from .packing import lm_head
from .rollout import generate_groups

_TOLERANCE = 1e-6  # a float reward within this of its maximum is at the maximum


@torch.no_grad()
def greedy_completions(
    model,
    tokenizer,
    prompts: list,
    *,
    system_prompt=None,
    max_prompt_length: int,
    max_new_tokens: int,
    batch: int = 16,
    compile_decode: bool | None = None,
) -> tuple[list[str], list[list[int]]]:
    """The greedy completion of each prompt (text or chat messages): decoded text (special tokens skipped) and
    token ids (up to and including EOS), in prompt order, `batch` prompts per generate_groups call (each with
    `compile_decode`, as in generate_groups)."""
    device = lm_head(distributed.unwrap(model))[0].device
    enc = [policy.encode_prompt(tokenizer, p, system_prompt, max_prompt_length) for p in prompts]
    kw = dict(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id)
    kw |= dict(pad_token_id=tokenizer.pad_token_id, compile_decode=compile_decode)
    ids: list[list[int]] = []
    for i in range(0, len(enc), batch):
        chunk = [torch.tensor(e, dtype=torch.long, device=device) for e in enc[i : i + batch]]
        roll = distributed.forward(model, generate_groups, chunk, 1, **kw)
        lengths = roll.completion_mask.sum(1).tolist()  # (b,)
        ids += [roll.completion_ids[j, :n].tolist() for j, n in enumerate(lengths)]
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids], ids


def passed(funcs: dict, values: torch.Tensor) -> torch.Tensor | None:
    """(N,) float: 1 where every function declaring a maximum scored the sample there, 0 where one scored it
    lower, NaN where one gave no score; None when no function declares a maximum. `values`: (F, N) from
    rewards.table. RewardError when a function scores above the maximum it declares."""
    rows = []
    for (name, fn), row in zip(funcs.items(), values):
        top = rewards.maximum(fn)
        if top is None:
            continue
        if bool((row > top + _TOLERANCE).any()):
            raise rewards.RewardError(
                f"reward function {name!r} returned {float(row.nan_to_num(-math.inf).max())}, above the "
                f"max_reward {top} it declares"
            )
        rows.append(torch.where(row.isnan(), row, (row >= top - _TOLERANCE).float()))
    return torch.stack(rows).amin(0) if rows else None  # amin keeps NaN: unscored stays unscored


def score(funcs: dict, weights: list[float], prompts: list, completions, completion_ids, columns: dict) -> dict:
    """Pass rate, mean reward and per-function means of one completion per prompt."""
    values = rewards.table(funcs, prompts, completions, completion_ids, columns)  # (F, N)
    total, stats = rewards.combine(list(funcs), weights, values)
    ok = passed(funcs, values)
    scored = None if ok is None else ok[~ok.isnan()]
    pass_rate = None if scored is None or scored.numel() == 0 else float(scored.mean())
    means = {k: v for k, v in stats.items() if k.endswith("_mean")}
    return {"pass_rate": pass_rate, "reward": float(total.mean()), **means, "prompts": len(prompts)}


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    funcs: dict,
    weights: list[float] | None = None,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    system_prompt: str | None = None,
    max_prompt_length: int = 512,
    max_new_tokens: int = 256,
    batch: int = 16,
) -> dict:
    """Greedy completions of the held-out `rows` (dicts with `prompt_column`, and whatever columns the reward
    functions read) scored by `funcs` (name -> reward function) with `weights` (default all 1). Returns
    {"pass_rate", "reward", "reward_<name>_mean", ..., "prompts"} (see the module docstring)."""
    if not rows:
        raise ValueError("evaluate: rows is empty (no held-out prompts)")
    weights = [1.0] * len(funcs) if weights is None else weights
    prompts = [r[prompt_column] for r in rows]
    sizes = dict(system_prompt=system_prompt, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens)
    completions, ids = greedy_completions(model, tokenizer, prompts, batch=batch, **sizes)
    return score(funcs, weights, prompts, completions, ids, rewards.columns(rows, prompt_column, answer_column))
