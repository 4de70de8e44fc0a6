"""Reward functions with TRL's signature, and the scoring that checks them.

A reward function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`:
`prompts` and `completions` are lists of strings (one per sampled completion, prompts repeated G
times), `completion_ids` lists of token ids, and every other dataset column arrives as a keyword
list aligned with them. `None` means "no score": it is excluded from that function's statistics and
counts as 0 in the weighted sum (as in TRL). Accept `**kwargs` for columns you do not use.

A function may declare its maximum as an attribute, `fn.max_reward = 1.0`: evaluation (evaluate.py) counts
a sample as passed when every function that declares one scores it there. The built-ins declare 1, except
`length`, a shaping term with no maximum worth reaching; a function without the attribute takes no part in
the pass rate.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable

import torch

from .tasks import countdown_reward

RewardFn = Callable[..., list]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


class RewardError(ValueError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


def _to_number(text: str | None) -> float | None:
    if text is None:
        return None
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The number in the last `\\boxed{}`, else after a GSM8K `####`, else the last number in `text`."""
    boxed = _BOXED.findall(text)
    if boxed:
        return _to_number(boxed[-1])
    if "####" in text:
        return _to_number(text.split("####")[-1])
    return _to_number(text)


def math_reward(prompts, completions, completion_ids=None, *, answer=None, **kwargs) -> list[float | None]:
    """1 when the completion's answer (last `\\boxed{}` or last number) equals the `answer` column, else 0.
    None where the reference answer has no number."""
    if answer is None:
        raise ValueError("math reward needs an answer column (set --answer-column)")
    out = []
    for completion, ref in zip(completions, answer):
        want = extract_answer(str(ref))
        got = extract_answer(completion)
        out.append(None if want is None else float(got is not None and math.isclose(got, want, abs_tol=1e-6)))
    return out


def format_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1 when the completion is `<think>...</think><answer>...</answer>` (whitespace allowed around), else 0."""
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]


def length_reward(prompts, completions, completion_ids, *, max_new_tokens: int, **kwargs) -> list[float]:
    """1 - length / max_new_tokens: prefers short completions (use a small weight beside a task reward)."""
    return [1.0 - min(len(ids), max_new_tokens) / max_new_tokens for ids in completion_ids]


def soft_overlong_punishment(
    prompts, completions, completion_ids, *, max_new_tokens: int, soft_punish_cache: int, **kwargs
) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13) with L_max = max_new_tokens, L_cache =
    soft_punish_cache: 0 up to L_max - L_cache tokens, then (L_max - L_cache - |y|) / L_cache down to -1 at L_max,
    -1 beyond. |y| counts the EOS token. Equals TRL's `trl.rewards.get_soft_overlong_punishment`."""
    start = max_new_tokens - soft_punish_cache
    return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / soft_punish_cache) for ids in completion_ids]


def overlong_cache(max_new_tokens: int, soft_punish_cache: int | None) -> int:
    """L_cache: the configured one, or DAPO's proportion (4096 of a 20480-token budget, §4.1), at least 1."""
    return soft_punish_cache if soft_punish_cache is not None else max(1, max_new_tokens // 5)


def _reverse(*args, **kwargs):
    from .tiny import reverse_reward

    return reverse_reward(*args, **kwargs)


math_reward.max_reward = format_reward.max_reward = _reverse.max_reward = 1.0
length_reward.max_reward = None

BUILTIN: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "length": length_reward,
    "reverse": _reverse,
    "overlong": soft_overlong_punishment,
    "arithmetic": math_reward,  # the built-in arithmetic task: the last number equals the answer
    "countdown": countdown_reward,  # the built-in countdown task: the expression reaches the target
}


def maximum(fn: RewardFn) -> float | None:
    """The maximum `fn` declares (`fn.max_reward`), or None: a sample scored there passes."""
    value = getattr(fn, "max_reward", None)
    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r}: max_reward must be a finite number")
    return value


def resolve(name: str, max_new_tokens: int, soft_punish_cache: int | None = None) -> RewardFn:
    """A built-in name or `module:function`; raises ValueError naming `name` if it cannot be found."""
    if name == "length":
        fn = functools.partial(length_reward, max_new_tokens=max_new_tokens)
        return functools.update_wrapper(fn, length_reward)
    if name == "overlong":
        cache = overlong_cache(max_new_tokens, soft_punish_cache)
        fn = functools.partial(soft_overlong_punishment, max_new_tokens=max_new_tokens, soft_punish_cache=cache)
        return functools.update_wrapper(fn, soft_overlong_punishment)
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"rewards: unknown reward {name!r}; built-ins are {sorted(BUILTIN)}, or module:function")
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rewards: cannot load reward function {name!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"rewards: {name!r} is not callable")
    return fn


def configured(cfg) -> tuple[dict[str, RewardFn], list[float]]:
    """The run's reward functions by name and their weights: `cfg.rewards` (weighted by `cfg.reward_weights`), and
    the soft overlong punishment with weight 1 when `cfg.soft_overlong_punishment` asks for it and the rewards do
    not already name "overlong" (with a weight of their own)."""
    names, weights = list(cfg.rewards), list(cfg.reward_weights or [1.0] * len(cfg.rewards))
    if cfg.soft_overlong_punishment and "overlong" not in names:
        names, weights = [*names, "overlong"], [*weights, 1.0]
    funcs = {name: resolve(name, cfg.max_new_tokens, cfg.soft_punish_cache) for name in names}
    return funcs, weights


def columns(rows: list[dict], prompt_column: str, answer_column: str) -> dict[str, list]:
    """Dataset columns as keyword lists for the reward functions, the prompt column left out; the answer column
    also as `answer`, replacing a column of that name (the one the user named is the one the rewards score)."""
    out = {k: [r[k] for r in rows] for k in rows[0] if k != prompt_column}
    if answer_column in out:
        out["answer"] = out[answer_column]
    return out


def call(name: str, fn: RewardFn, prompts, completions, completion_ids, columns: dict) -> list[float]:
    """Runs one reward function and checks its output; None becomes NaN (no score)."""
    try:
        values = fn(prompts, completions, completion_ids, **columns)
    except Exception as e:
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
    if not hasattr(values, "__len__") or len(values) != len(completions):
        n = len(values) if hasattr(values, "__len__") else type(values).__name__
        raise RewardError(f"reward function {name!r} returned {n} values for {len(completions)} completions")
    return [_number(name, i, v) for i, v in enumerate(values)]


def _number(name: str, i: int, v) -> float:
    """One returned value as a float (NaN for None); RewardError naming the function, the index and the value."""
    if v is None:
        return float("nan")
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError
        f = float(v)  # int, float, bool, numpy and 0-d / one-element tensor scalars
    except (TypeError, ValueError, RuntimeError):
        text = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
        raise RewardError(
            f"reward function {name!r} returned {type(v).__name__} {text} at index {i}; expected a number or None"
        ) from None
    if not math.isfinite(f):
        raise RewardError(f"reward function {name!r} returned a non-finite value {f} (use None for no score)")
    return f


def table(funcs: dict[str, RewardFn], prompts, completions, completion_ids, columns: dict) -> torch.Tensor:
    """(F, N) float32: each reward function's values, NaN where it gave no score (None)."""
    values = [call(name, fn, prompts, completions, completion_ids, columns) for name, fn in funcs.items()]
    return torch.tensor(values, dtype=torch.float32).reshape(len(funcs), len(completions))


def combine(names, weights: list[float], values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total (N,) of a (F, N) table and per-function mean/std over the scored (non-NaN) values."""
    w = torch.tensor(weights, dtype=torch.float32).unsqueeze(1)  # (F, 1)
    total = (values.nan_to_num(0.0) * w).sum(0)  # (N,)
    stats = {}
    for name, row in zip(names, values):
        scored = row[~row.isnan()]
        stats[f"reward_{name}_mean"] = float(scored.mean()) if scored.numel() else float("nan")
        stats[f"reward_{name}_std"] = float(scored.std()) if scored.numel() > 1 else 0.0
    return total, stats


def score(
    funcs: dict[str, RewardFn], weights: list[float], prompts, completions, completion_ids, columns: dict
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total reward (N,) float32 and per-function mean/std over the scored (non-None) values."""
    return combine(list(funcs), weights, table(funcs, prompts, completions, completion_ids, columns))
