"""Held-out evaluation in the training loop: which prompts, when, and where the numbers go (evaluate.py computes
them: greedy completions through generate_groups, scored by the run's reward functions).

- The eval set: `eval_dataset`, a local .jsonl/.json/.csv/.parquet file (loaded whole) or a built-in task's held-out
  split (`reverse`, `arithmetic`, `countdown` with the run's task options; `gsm8k`: its test split). Unset: the
  training dataset's own held-out split when it is a built-in task trained on its "train" split, else none. Its
  first `eval_prompts` rows are evaluated every time (the points of the curve compare the same prompts), each
  checked like a training row (dataset_rows) before the model loads.
- When: before step 1 ("step 0"), after every `eval_steps`-th step and after the last one.
- Where: `eval_`-prefixed fields of that step's metrics.jsonl row; step 0 gets a row of its own (no training
  fields). Every row stays one step, so the resume truncation keeps or drops an evaluation with its step, and the
  fields are written before the step's checkpoint: a resumed run's rows equal an uninterrupted run's.
- Evaluating draws no random number and changes no weight: training is the same with or without it. Under torchrun
  every rank evaluates every prompt (greedy decoding is deterministic, so the ranks agree, and fsdp2's collectives
  see the same forwards on every rank); rank 0 writes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from . import config, data, dataset_rows, distributed, evaluate, rewards, run_log
from .run_log import say


def source(cfg) -> tuple[str, str] | None:
    """(dataset, split) of the eval set, or None when the run evaluates nothing. ValueError when `eval_dataset`
    names neither a built-in task nor a local file, or names the training prompts themselves."""
    name = cfg.eval_dataset
    if cfg.eval_prompts == 0:
        return None
    if name is None:
        builtin = cfg.dataset in data.BUILTIN and cfg.dataset_split == "train"
        return (cfg.dataset, "test") if builtin else None
    if name in data.BUILTIN:
        if name == cfg.dataset and cfg.dataset_split == "test":
            raise ValueError(f"eval_dataset {name!r} is its held-out split, which this run trains on (dataset_split)")
        return name, "test"
    path = Path(name).expanduser()
    if path.suffix.lower() not in data.FILE_TYPES:
        raise ValueError(
            f"eval_dataset must be a built-in task ({', '.join(data.BUILTIN)}) or a local "
            f"{'/'.join(data.FILE_TYPES)} file, got {name!r} (save a hub dataset's held-out split as .jsonl)"
        )
    if path.exists() and Path(cfg.dataset).expanduser().exists() and path.samefile(Path(cfg.dataset).expanduser()):
        raise ValueError(f"eval_dataset {name!r} is the training dataset: held-out prompts must be others")
    return name, "train"


def rows(cfg, tokenizer, funcs: dict, weights: list[float]) -> list[dict] | None:
    """The first `eval_prompts` rows of the eval set (None: no evaluation), each prompt encoded and its answer
    checked, the reward functions dry-run on them; ValueError naming `eval_dataset` otherwise."""
    where = source(cfg)
    if where is None:
        return None
    name, split = where
    try:
        found = data.load(name, None, split, cfg.prompt_column, cfg.answer_column, cfg)
        picked = [dict(found[i]) for i in range(min(cfg.eval_prompts, len(found)))]
        dataset_rows.encode(picked, cfg, tokenizer)
        dataset_rows.check_answers(picked, cfg)
        dataset_rows.dry_run(funcs, weights, picked, cfg)
    except ValueError as e:
        which = " (its held-out split)" if name in data.BUILTIN else ""
        raise ValueError(f"eval_dataset {name!r}{which}: {e}") from None
    if len(picked) < cfg.eval_prompts:
        say(f"note: eval_dataset {name!r} has {len(picked)} rows: each evaluation scores all of them")
    return picked


def describe(got: dict, prefix: str = "") -> str:
    """One line of numbers, e.g. 'pass rate 0.500, mean reward 0.610' (no pass rate when no reward declares a
    maximum; a mean that overflowed, null in metrics.jsonl, reads 'nan')."""
    rate, mean = got[prefix + "pass_rate"], got[prefix + "reward"]
    return ("" if rate is None else f"pass rate {rate:.3f}, ") + f"mean reward {math.nan if mean is None else mean:.3f}"


class HeldOut:
    """The run's evaluations: `after(model, step)` gives the eval_ fields of the one due after `step` updates ({}
    when none is due); `summary` says how the held-out numbers moved."""

    def __init__(self, cfg, rows: list[dict] | None, funcs: dict, weights: list[float], tokenizer):
        self.cfg, self.rows, self.funcs, self.weights, self.tokenizer = cfg, rows, funcs, weights, tokenizer

    @classmethod
    def load(cls, cfg, tokenizer, funcs: dict, weights: list[float]) -> HeldOut:
        """The run's eval set (`rows`), checked before the model loads."""
        return cls(cfg, rows(cfg, tokenizer, funcs, weights), funcs, weights, tokenizer)

    def due(self, step: int) -> bool:
        every = self.cfg.eval_steps
        return self.rows is not None and (step in (0, self.cfg.max_steps) or bool(every and step % every == 0))

    def after(self, model, step: int) -> dict:
        if not self.due(step):
            return {}
        cfg, n = self.cfg, len(self.rows)
        say(f"eval after step {step}: greedy completions of {n} held-out prompts")
        t0 = time.perf_counter()
        prompts = [r[cfg.prompt_column] for r in self.rows]
        rank_prompts = (cfg.rollout_groups or cfg.prompts_per_step // distributed.world()[1]) * cfg.group_size
        sizes = dict(system_prompt=cfg.system_prompt, max_prompt_length=cfg.max_prompt_length)
        sizes["compile_decode"] = config.COMPILE_DECODE[cfg.compile_decode]  # as the rollouts decode
        was_training = model.training
        model.eval()
        try:
            texts, ids = evaluate.greedy_completions(
                model, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch=max(1, rank_prompts), **sizes
            )
        finally:
            model.train(was_training)
        columns = rewards.columns(self.rows, cfg.prompt_column, cfg.answer_column)
        got = evaluate.score(self.funcs, self.weights, prompts, texts, ids, columns)
        eos = self.tokenizer.eos_token_id
        got["completion_length_mean"] = sum(map(len, ids)) / n
        got["clipped_ratio"] = sum(len(x) == cfg.max_new_tokens and x[-1] != eos for x in ids) / n
        say(f"eval after step {step}: {describe(got)} ({n} prompts, {time.perf_counter() - t0:.1f} s)")
        return {f"eval_{k}": v for k, v in got.items()}

    def summary(self, metrics_path: Path) -> None:
        """One line on stderr: the held-out numbers at the run's first and last evaluations (read back from
        metrics.jsonl, so that a resumed run reports its whole history)."""
        evals = [r for r in run_log.read_jsonl(metrics_path) if "eval_reward" in r]
        if evals:
            first, last = evals[0], evals[-1]
            say(
                f"held-out ({last['eval_prompts']} prompts, greedy): {describe(first, 'eval_')} after step "
                f"{first['step']} -> {describe(last, 'eval_')} after step {last['step']}"
            )
