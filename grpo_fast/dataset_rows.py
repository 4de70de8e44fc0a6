"""Every dataset row checked and encoded before step 1, so that a bad row anywhere in the data stops the run up
front with its index, instead of as a traceback when it is drawn (and with the steps since the last checkpoint
lost). Also what the reward functions receive from the rows.

A prompt is a string, or chat messages (policy.encode_prompt says exactly what is accepted). The built-in rewards
that compare with an answer (`math`, `reverse`) need the answer column in every row; the column named by
`answer_column` reaches every reward function as the keyword `answer`.
"""

from __future__ import annotations

import numpy as np

from . import policy, rewards
from .run_log import say

ANSWER_REWARDS = ("math", "reverse", "arithmetic")  # built-in rewards that compare with the `answer` keyword


def column(rows, name: str) -> list:
    """A column as a list (a datasets.Dataset returns it whole; a list of dicts gives None where a key is missing)."""
    return list(rows[name]) if hasattr(rows, "column_names") else [r.get(name) for r in rows]


def columns(rows) -> list[str]:
    return list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def encode(rows, cfg, tokenizer) -> list[np.ndarray]:
    """Token ids (int32 arrays: 4 bytes a token, not a Python int's 36) of every row's prompt, chat template
    applied, each checked; ValueError naming the row."""
    if cfg.system_prompt and not getattr(tokenizer, "chat_template", None):
        raise ValueError("system_prompt needs a tokenizer with a chat template; this one has none")
    out = []
    for i, prompt in enumerate(column(rows, cfg.prompt_column)):
        try:
            ids = policy.encode_prompt(tokenizer, prompt, cfg.system_prompt, cfg.max_prompt_length)
            out.append(np.asarray(ids, dtype=np.int32))
        except ValueError as e:
            raise ValueError(f"dataset row {i}: {e}") from None
    return out


def _check_answer(i: int, answer, cfg) -> None:
    needs = [r for r in cfg.rewards if r in ANSWER_REWARDS]
    if answer is None:
        raise ValueError(f"dataset row {i}: no answer in column {cfg.answer_column!r}; the {needs} reward needs one")
    if "reverse" in needs and not isinstance(answer, str):
        raise ValueError(f"dataset row {i}: the reverse reward needs a string answer, got {_short(answer)}")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"dataset row {i}: the math reward needs a text or number answer, got {_short(answer)}")


def check_answers(rows, cfg) -> None:
    """The answer column exists where it is named or needed, every row has one, and `math` can score some rows:
    a column without a single number would make it return None (no score) for every sample, all run long."""
    names = columns(rows)
    needed = any(r in ANSWER_REWARDS for r in cfg.rewards)
    if cfg.answer_column not in names:
        if needed or cfg.answer_column != "answer":
            raise ValueError(f"dataset has no answer column {cfg.answer_column!r}; columns: {names}")
        return
    if cfg.answer_column != "answer" and "answer" in names:
        say(f"note: the rewards receive column {cfg.answer_column!r} as `answer` (the dataset's 'answer' is hidden)")
    if not needed:
        return
    answers = column(rows, cfg.answer_column)
    for i, answer in enumerate(answers):
        _check_answer(i, answer, cfg)
    if "math" in cfg.rewards:
        none = [i for i, a in enumerate(answers) if rewards.extract_answer(str(a)) is None]
        if len(none) == len(answers):
            raise ValueError(
                f"the math reward finds no number in column {cfg.answer_column!r} (row 0: {_short(answers[0])}): "
                "it would score no sample; set --answer-column, or choose other --rewards"
            )
        if none:
            say(f"warning: {len(none)} of {len(answers)} rows have no number in {cfg.answer_column!r} (first: row "
                f"{none[0]}): the math reward gives them no score")  # fmt: skip


def dry_run(funcs, weights, rows, cfg) -> None:
    """Every reward function once on two rows with empty completions (which a policy may produce): a function
    that raises, miscounts or returns non-numbers fails here, before the model loads."""
    first = [rows[i] for i in range(min(2, len(rows)))]
    prompts = [r[cfg.prompt_column] for r in first]
    rewards.score(
        funcs,
        weights,
        prompts,
        [""] * len(first),
        [[] for _ in first],
        rewards.columns(first, cfg.prompt_column, cfg.answer_column),
    )
